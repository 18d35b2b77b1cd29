"""The whole pipeline with real processes: socket -> message + outbox row -> relay -> RabbitMQ ->
analytics worker -> counts. Killed workers and relays, cut connections: tests/faults/test_analytics.py."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from urllib.parse import urlparse

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import Client

from analytics.models import ProcessedEvent
from chat import services
from chat.models import Message
from chatproject.asgi import application
from messaging.models import OutboxEvent
from messaging.topology import ANALYTICS_QUEUE
from tests.conftest import session_cookie, site_origin
from tests.harness import wait_until

pytestmark = pytest.mark.broker

# Generous deadlines: they only bound a failing test, a passing one returns as soon as it can.
DEADLINE = 90


@pytest.fixture(autouse=True)
def _no_rate_limit(settings) -> None:
    # The tests send bursts on purpose; the rate limit has its own tests.
    settings.CHAT_RATE_BURST = 100_000


def vhost_of(broker_url: str) -> str:
    return urlparse(broker_url).path.removeprefix("/") or "/"


def analytics_queue_depth(broker_url: str) -> int:
    """Messages in the analytics queue, ready plus delivered-but-unacked."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            vhost_of(broker_url),
            "--no-table-headers",
            "name",
            "messages",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        name, _, count = line.partition("\t")
        if name == ANALYTICS_QUEUE.name:
            return int(count)
    raise AssertionError(f"no {ANALYTICS_QUEUE.name} queue in {out!r}")


def api_message_count(user, slug: str) -> int:
    client = Client()
    client.force_login(user)
    response = client.get(f"/api/analytics/rooms/{slug}/")
    assert response.status_code == 200, response.content
    return response.json()["message_count"]


def wait_for_exact_count(*, user, slug: str, expected: int, broker_url: str) -> None:
    """Wait until every event is counted and nothing is left to deliver, then check the count.

    Waiting for the queue to drain as well means a redelivered batch has been processed before
    the count is read, so a double count would show.
    """

    def settled() -> bool:
        return (
            not OutboxEvent.objects.filter(sent_at__isnull=True).exists()
            and analytics_queue_depth(broker_url) == 0
            and api_message_count(user, slug) >= expected
        )

    wait_until(settled, timeout=DEADLINE, message=f"{expected} messages were not all counted")
    assert api_message_count(user, slug) == expected
    assert ProcessedEvent.objects.count() == Message.objects.count() == expected


async def chat_over_sockets(users, slug: str, per_user: int) -> list[dict]:
    """Each user sends `per_user` messages over its own socket; returns every reply to the senders."""

    async def one_user(user) -> list[dict]:
        cookie = await sync_to_async(session_cookie)(user)
        communicator = WebsocketCommunicator(
            application,
            f"/ws/rooms/{slug}/",
            headers=[(b"origin", site_origin().encode()), (b"cookie", f"sessionid={cookie}".encode())],
        )
        connected, _ = await communicator.connect()
        assert connected
        replies = []
        for i in range(per_user):
            client_id = str(uuid.uuid4())
            await communicator.send_json_to({"type": "message", "text": f"hello {i}", "client_id": client_id})
            while True:  # skip the other users' live messages
                frame = await communicator.receive_json_from(timeout=10)
                if frame.get("client_id") == client_id:
                    replies.append(frame)
                    break
        await communicator.disconnect()
        return replies

    results = await asyncio.gather(*(one_user(user) for user in users))
    return [reply for replies in results for reply in replies]


def store_in_one_commit(*, room, author, count: int) -> None:
    """Store `count` messages in one transaction, so the relay publishes them as one task message."""
    with transaction.atomic():
        for i in range(count):
            services.message_create(room=room, author=author, text=f"m{i}", client_id=uuid.uuid4())


def test_messages_sent_over_websockets_are_counted_exactly_once(
    make_user, make_room, start_relay, start_worker, broker_url
):
    users = [make_user(f"user{i}") for i in range(3)]
    make_room("general")
    start_worker()
    start_relay()

    replies = async_to_sync(chat_over_sockets)(users, "general", 25)

    assert [r["type"] for r in replies] == ["message"] * 75
    wait_for_exact_count(user=users[0], slug="general", expected=75, broker_url=broker_url)
