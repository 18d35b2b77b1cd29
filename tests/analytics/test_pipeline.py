"""The whole pipeline with real processes: socket -> message + outbox row -> relay -> RabbitMQ ->
analytics worker -> counts, including workers killed mid-batch and a cut broker connection."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from urllib.parse import urlparse

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection, transaction
from django.test import Client

from analytics import selectors
from analytics.models import ProcessedEvent
from chat import services
from chat.models import Message
from chatproject.asgi import application
from messaging.models import OutboxEvent
from messaging.topology import ANALYTICS_QUEUE
from tests.conftest import session_cookie, site_origin
from tests.faults.points import fault_env
from tests.waiting import wait_until

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


def worker_backend_in_transaction() -> bool:
    """A worker's database session is inside its batch transaction: counts written, not committed."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction' AND query LIKE 'INSERT INTO analytics_usermessagecount%%'"
        )
        return cursor.fetchone()[0] > 0


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


def test_worker_killed_inside_its_transaction_loses_nothing(
    make_user, make_room, start_relay, start_worker, broker_url
):
    alice = make_user("alice")
    room = make_room("general")
    doomed = start_worker(ANALYTICS_FAULT_PAUSE_SECONDS="120", ANALYTICS_FAULT_PAUSE_AT="in_transaction")
    start_relay()
    store_in_one_commit(room=room, author=alice, count=50)
    wait_until(
        worker_backend_in_transaction, timeout=DEADLINE, message="the worker never held its batch open"
    )

    doomed.kill()

    assert selectors.room_message_count(room_id=room.pk) == 0, "nothing commits before the batch ends"
    start_worker()
    wait_for_exact_count(user=alice, slug="general", expected=50, broker_url=broker_url)


def test_worker_killed_after_commit_before_ack_counts_redelivery_once(
    make_user, make_room, start_relay, start_worker, broker_url
):
    alice = make_user("alice")
    room = make_room("general")
    doomed = start_worker(ANALYTICS_FAULT_PAUSE_SECONDS="120", ANALYTICS_FAULT_PAUSE_AT="after_commit")
    start_relay()
    store_in_one_commit(room=room, author=alice, count=50)
    wait_until(
        lambda: ProcessedEvent.objects.count() == 50,
        timeout=DEADLINE,
        message="the batch was never committed",
    )

    doomed.kill()

    successor = start_worker()
    wait_for_exact_count(user=alice, slug="general", expected=50, broker_url=broker_url)
    # The unacked message did come again, and the ledger turned it into a no-op.
    assert "'duplicates': 50" in successor.log_text()


def test_relay_killed_between_publish_and_mark_is_counted_once(
    make_user, make_room, start_relay, start_worker, broker_url
):
    alice = make_user("alice")
    room = make_room("general")
    worker = start_worker()
    crashing = start_relay(**fault_env({"relay.after_confirm": "crash"}))
    store_in_one_commit(room=room, author=alice, count=20)
    wait_until(
        lambda: crashing.process.poll() is not None, timeout=DEADLINE, message="the relay did not crash"
    )
    assert OutboxEvent.objects.filter(sent_at__isnull=True).count() == 20, "published, but not marked sent"

    start_relay()

    wait_for_exact_count(user=alice, slug="general", expected=20, broker_url=broker_url)
    assert "'duplicates': 20" in worker.log_text()


def test_chat_goes_on_while_broker_connections_are_cut_and_counts_are_exact_after(
    make_user, make_room, start_relay, start_worker, broker_url
):
    users = [make_user(f"user{i}") for i in range(2)]
    make_room("general")
    start_worker()
    start_relay()
    vhost = vhost_of(broker_url)
    before = async_to_sync(chat_over_sockets)(users, "general", 10)

    # Refuse the vhost to guest and drop its connections: the relay and the worker lose RabbitMQ
    # (and cannot come back) while the broker stays up for everyone else's vhosts.
    subprocess.run(["rabbitmqctl", "-q", "clear_permissions", "-p", vhost, "guest"], check=True)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "analytics outage test"], check=True
        )
        during = async_to_sync(chat_over_sockets)(users, "general", 15)
        assert [r["type"] for r in during] == ["message"] * 30, (
            "users must see no error while RabbitMQ is away"
        )
        assert OutboxEvent.objects.filter(sent_at__isnull=True).exists(), "events wait in the outbox"
    finally:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
        )

    assert [r["type"] for r in before] == ["message"] * 20
    wait_for_exact_count(user=users[0], slug="general", expected=50, broker_url=broker_url)
