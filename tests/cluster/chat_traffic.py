"""Chat traffic through a real daphne while a test breaks RabbitMQ nodes, and the counts it is judged by.

`ChatTraffic` runs chat users in a thread of their own, each on a room socket, sending messages at a
steady pace and waiting for each acknowledgement; every frame they receive is kept. `PipelineCounts`
compares what the senders were told was stored with what PostgreSQL holds and what analytics counted.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import websockets

from analytics.models import ProcessedEvent
from analytics.selectors import room_message_count
from bench.procfile import DaphneServer, ProcfileProcess
from chat.models import Message, Room
from messaging.models import OutboxEvent
from tests.conftest import session_cookie
from tests.harness import wait_until

# How long a sender waits for its acknowledgement: chat writes only PostgreSQL, so a RabbitMQ
# node's death must not delay it; the bound only ends a broken run.
ACK_TIMEOUT_SECONDS = 10
# A Celery worker logs each task's result; a batch's `duplicates` are events the ledger had
# already counted, that is, events RabbitMQ delivered more than once.
TASK_DUPLICATES = re.compile(r"'duplicates': (\d+)")


@dataclass
class ChatClient:
    """One user's socket: what it sent, which of those were acknowledged, every frame it received."""

    cookie: str
    sent: list[str] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    frames: list[dict] = field(default_factory=list)
    failure: str | None = None


class ChatTraffic:
    """Each user sends a message every `interval` seconds over daphne's room socket, from `start`
    until `finish` (at most `most_per_client`, so that a broken run ends)."""

    def __init__(
        self, server: DaphneServer, users: list, *, room: Room, interval: float, most_per_client: int = 1000
    ) -> None:
        self.server = server
        self.room = room
        self.interval = interval
        self.most_per_client = most_per_client
        self.clients = [ChatClient(cookie=session_cookie(user)) for user in users]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> ChatTraffic:
        self._thread.start()
        return self

    def sent(self) -> int:
        return sum(len(client.sent) for client in self.clients)

    def wait_for_sent(self, count: int) -> None:
        """Until the users have sent `count` messages between them: a point to break something at."""
        wait_until(
            lambda: self.sent() >= count or not self._thread.is_alive(),
            timeout=count * self.interval + 60,
            message=f"the chat users did not send {count} messages",
        )

    def finish(self) -> None:
        """Stop sending; returns once every user has its last acknowledgement (or failed)."""
        self._stopping.set()
        self._thread.join(timeout=ACK_TIMEOUT_SECONDS + 30)
        assert not self._thread.is_alive(), "the chat users never finished"

    @property
    def acked(self) -> set[str]:
        return {client_id for client in self.clients for client_id in client.acked}

    @property
    def frames(self) -> list[dict]:
        return [frame for client in self.clients for frame in client.frames]

    @property
    def failures(self) -> list[str]:
        return [client.failure for client in self.clients if client.failure]

    async def _run(self) -> None:
        await asyncio.gather(*(self._chat(client) for client in self.clients))

    async def _chat(self, client: ChatClient) -> None:
        try:
            async with websockets.connect(
                f"{self.server.ws_url}/ws/rooms/{self.room.slug}/",
                origin=f"http://127.0.0.1:{self.server.port}",
                additional_headers={"Cookie": f"sessionid={client.cookie}"},
                max_size=None,
            ) as socket:
                for i in range(self.most_per_client):
                    if self._stopping.is_set():
                        break
                    client_id = str(uuid.uuid4())
                    await socket.send(
                        json.dumps({"type": "message", "text": f"m{i}", "client_id": client_id})
                    )
                    client.sent.append(client_id)
                    async with asyncio.timeout(ACK_TIMEOUT_SECONDS):
                        while True:  # the other users' messages arrive in between
                            frame = json.loads(await socket.recv())
                            client.frames.append(frame)
                            if frame.get("client_id") == client_id:
                                break
                    if frame.get("type") == "message":
                        client.acked.add(client_id)
                    await asyncio.sleep(self.interval)
        except Exception as error:  # the test asserts there was none
            client.failure = f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class PipelineCounts:
    """The room's messages at each step. lost: acknowledged but not stored, or stored but not
    counted; duplicated: counted more than once."""

    acked: int
    stored: int
    counted: int
    lost: int
    duplicated: int
    redelivered: int  # events RabbitMQ delivered again, which the ledger did not count again

    def __str__(self) -> str:
        return (
            f"acked={self.acked} stored={self.stored} counted={self.counted} lost={self.lost} "
            f"duplicated={self.duplicated} (redelivered, not counted again: {self.redelivered})"
        )


def pipeline_counts(*, room: Room, acked: set[str], workers: list[ProcfileProcess]) -> PipelineCounts:
    stored = dict(Message.objects.filter(room=room).values_list("id", "client_id"))
    stored_client_ids = {str(client_id) for client_id in stored.values()}
    in_ledger = set(ProcessedEvent.objects.filter(room=room).values_list("message_id", flat=True))
    counted_once = len(stored.keys() & in_ledger)
    counted = room_message_count(room_id=room.pk)
    return PipelineCounts(
        acked=len(acked),
        stored=len(stored),
        counted=counted,
        lost=len(acked - stored_client_ids) + len(stored.keys() - in_ledger) + max(0, counted_once - counted),
        duplicated=max(0, counted - counted_once),
        redelivered=sum(
            int(duplicates) for worker in workers for duplicates in TASK_DUPLICATES.findall(worker.log_text())
        ),
    )


def wait_until_settled(
    *, room: Room, analytics_queue_messages: Callable[[], int], timeout: float = 120
) -> None:
    """Until nothing is on its way: no outbox row unsent, the analytics queue empty (so a redelivery
    has been processed before anything is counted), every stored message in the ledger.

    Returns at the deadline either way: the counts then say what is missing.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            not OutboxEvent.objects.filter(sent_at__isnull=True).exists()
            and not Message.objects.filter(room=room)
            .exclude(id__in=ProcessedEvent.objects.filter(room=room).values("message_id"))
            .exists()
            and analytics_queue_messages() == 0
        ):
            return
        time.sleep(0.5)
