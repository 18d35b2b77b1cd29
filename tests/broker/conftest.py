"""Fixtures for the relay and topology tests: a probe queue that sees every chat event, scratch vhosts."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from kombu import Connection, Queue

from chat.services import message_create
from messaging.models import OutboxEvent
from messaging.topology import ANALYTICS_QUEUE, CHAT_EVENTS_EXCHANGE


@dataclass
class ProbedMessage:
    headers: dict
    properties: dict
    events: list[dict]


class ProbeQueue:
    """A queue bound to `chat_events` with `#`: a copy of every chat event the relay publishes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queue = Queue(f"probe-{uuid.uuid4().hex[:8]}", exchange=CHAT_EVENTS_EXCHANGE, routing_key="#")

    def declare(self) -> None:
        with Connection(self.url) as conn:
            self.queue.bind(conn.default_channel).declare()

    def drain(self) -> list[ProbedMessage]:
        """Every message currently in the queue, consumed (acked) in order."""
        messages = []
        with Connection(self.url) as conn:
            queue = self.queue.bind(conn.default_channel)
            while (message := queue.get(no_ack=True)) is not None:
                args, _kwargs, _embed = json.loads(message.body)
                messages.append(ProbedMessage(message.headers, message.properties, args[0]))
        return messages

    def delete(self) -> None:
        with Connection(self.url) as conn:
            self.queue.bind(conn.default_channel).delete()


@pytest.fixture
def probe_queue(broker_url) -> Iterator[ProbeQueue]:
    probe = ProbeQueue(broker_url)
    probe.declare()
    yield probe
    probe.delete()
    # Events left in the shared vhost's analytics queue would be counted by a later test's worker.
    with Connection(broker_url) as conn:
        ANALYTICS_QUEUE.bind(conn.default_channel).purge()


@pytest.fixture
def scratch_broker_url() -> Iterator[str]:
    """An empty vhost of this test's own, for tests that build a wrong or partial topology."""
    vhost = f"test_scratch_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    yield f"amqp://guest:guest@localhost:5672/{vhost}"
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False, capture_output=True)


@pytest.fixture
def send_messages(make_user, make_room) -> Callable[[int], list[OutboxEvent]]:
    """Store `n` chat messages the way the socket does; returns their outbox events."""
    author = make_user("alice")
    room = make_room("general", members=(author,))

    def send(n: int) -> list[OutboxEvent]:
        for i in range(n):
            message_create(room=room, author=author, text=f"hello {i}", client_id=uuid.uuid4())
        return list(OutboxEvent.objects.order_by("-id")[:n])[::-1]

    return send
