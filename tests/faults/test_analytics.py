"""The analytics pipeline under faults: workers SIGKILLed inside and after their transaction, a relay
crashing between the broker's confirm and marking its rows, the broker connections cut. Counts stay
exact: nothing lost, nothing counted twice."""

from __future__ import annotations

import subprocess

import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from analytics import selectors
from analytics.models import ProcessedEvent
from messaging.models import OutboxEvent
from tests.analytics.test_pipeline import (
    DEADLINE,
    chat_over_sockets,
    store_in_one_commit,
    vhost_of,
    wait_for_exact_count,
)
from tests.faults.points import fault_env
from tests.harness import wait_until

pytestmark = pytest.mark.broker


def worker_backend_in_transaction() -> bool:
    """A worker's database session is inside its batch transaction: counts written, not committed."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction' AND query LIKE 'INSERT INTO analytics_usermessagecount%%'"
        )
        return cursor.fetchone()[0] > 0


@pytest.fixture(autouse=True)
def _no_rate_limit(settings) -> None:
    # The tests send bursts on purpose; the rate limit has its own tests.
    settings.CHAT_RATE_BURST = 100_000


def test_worker_killed_inside_its_transaction_loses_nothing(
    make_user, make_room, start_relay, start_worker, broker_url
):
    alice = make_user("alice")
    room = make_room("general")
    doomed = start_worker(FAULT_POINTS="analytics.in_transaction=120")
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
    doomed = start_worker(FAULT_POINTS="analytics.after_commit=120")
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
    wait_until(lambda: crashing.poll() is not None, timeout=DEADLINE, message="the relay did not crash")
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
