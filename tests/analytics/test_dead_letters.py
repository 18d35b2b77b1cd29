"""Events that can never be counted are dead-lettered once, and the worker goes on."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from kombu import Connection, Producer

from analytics import selectors
from chat import services
from chatproject.celery import app
from messaging.topology import CHAT_EVENTS_EXCHANGE, DEAD_LETTER_QUEUE
from tests.analytics.test_services import chat_event
from tests.harness import wait_until

pytestmark = pytest.mark.broker

TASK = "analytics.record_chat_events"
DEADLINE = 60


@pytest.fixture
def broker(broker_url) -> Iterator[Connection]:
    with Connection(broker_url) as connection:
        yield connection


def publish_task(connection: Connection, *, args: list, body: bytes | None = None) -> str:
    """Publish a Celery task message for the analytics task, as the relay would (or broken)."""
    task_id = str(uuid.uuid4())
    headers, properties, task_body, _ = app.amqp.as_task_v2(task_id, TASK, args=args)
    producer = Producer(connection.channel())
    producer.publish(
        body if body is not None else json.dumps(task_body).encode(),
        exchange=CHAT_EVENTS_EXCHANGE.name,
        routing_key="chat.message.created",
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        **properties,
    )
    return task_id


def dead_letter_task_ids(connection: Connection) -> list[str]:
    """Drain the dead-letter queue; the task ids of the messages that were in it."""
    ids = []
    channel = connection.channel()
    while (message := channel.basic_get(DEAD_LETTER_QUEUE.name, no_ack=True)) is not None:
        ids.append(message.headers.get("id"))
    channel.close()
    return ids


def test_batch_with_invalid_event_is_dead_lettered_and_counts_nothing(
    broker, start_worker, make_user, make_room
):
    alice = make_user("alice")
    room = make_room("general")
    valid = {
        "event_id": str(uuid.uuid4()),
        "type": "chat.message.created",
        "message_id": 1,
        "room_id": room.pk,
        "room": room.slug,
        "author_id": alice.pk,
        "seq": 1,
        "created_at": "2026-11-27T10:00:00+00:00",
    }
    start_worker()
    task_id = publish_task(broker, args=[[valid, {**valid, "event_id": "nope"}]])
    seen: list[str] = []
    wait_until(
        lambda: seen.extend(dead_letter_task_ids(broker)) or task_id in seen,
        timeout=DEADLINE,
        message="the invalid batch did not reach dead_letters",
    )
    assert seen.count(task_id) == 1, "rejected once, not retried"
    assert selectors.room_message_count(room_id=room.pk) == 0


def test_batch_with_events_past_the_ledger_horizon_counts_the_others_then_is_dead_lettered(
    broker, start_worker, make_user, make_room, settings
):
    alice = make_user("alice")
    room = make_room("general")
    too_old = datetime.now(UTC) - timedelta(days=settings.ANALYTICS_LEDGER_RETENTION_DAYS + 1)
    events = [
        chat_event(room=room, author=alice, message_id=1, created_at=too_old),
        chat_event(room=room, author=alice, message_id=2),
    ]
    worker = start_worker()
    task_id = publish_task(broker, args=[events])
    seen: list[str] = []
    wait_until(
        lambda: seen.extend(dead_letter_task_ids(broker)) or task_id in seen,
        timeout=DEADLINE,
        message=f"the batch was not dead-lettered; worker log:\n{worker.log_text()[-2000:]}",
    )
    assert seen.count(task_id) == 1, "rejected once, not retried"
    assert selectors.room_message_count(room_id=room.pk) == 1, "the recent event is counted, the old one not"
    assert "1 of 2 events were created before" in worker.log_text()


def test_undecodable_task_message_is_dead_lettered(broker, start_worker):
    start_worker()
    task_id = publish_task(broker, args=[[]], body=b"\xff{not json")
    seen: list[str] = []
    wait_until(
        lambda: seen.extend(dead_letter_task_ids(broker)) or task_id in seen,
        timeout=DEADLINE,
        message="the undecodable message did not reach dead_letters",
    )


def test_worker_keeps_counting_after_dead_lettering(broker, make_user, make_room, start_relay, start_worker):
    alice = make_user("alice")
    room = make_room("general")
    worker = start_worker()
    start_relay()
    poison = {
        publish_task(broker, args=[[{"type": "bogus"}]]),
        publish_task(broker, args=[[]], body=b"\xff{not json"),
    }

    for i in range(5):
        services.message_create(room=room, author=alice, text=f"m{i}", client_id=uuid.uuid4())

    wait_until(
        lambda: selectors.room_message_count(room_id=room.pk) == 5,
        timeout=DEADLINE,
        message=f"later events were not counted; worker log:\n{worker.log_text()[-2000:]}",
    )
    seen: list[str] = []
    wait_until(
        lambda: seen.extend(dead_letter_task_ids(broker)) or poison <= set(seen),
        timeout=DEADLINE,
        message="both poison messages should be in dead_letters",
    )
