"""messaging.events: every relayed event reaches a registered task on its queue, and its builder
and parser agree."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from celery.exceptions import Reject
from django.conf import settings
from kombu import Connection

from chatproject.celery import app
from messaging.events import (
    MENTION,
    MESSAGE_CREATED,
    PRIORITY_HIGH,
    RELAYED_EVENTS,
    EventType,
    InvalidEvent,
    Mention,
    MentionPayload,
    MessageCreated,
    MessageCreatedPayload,
    event_envelope,
    mention_fields,
    message_created_payload,
    task_routes,
)
from messaging.retrying import DeadLetteringTask
from messaging.topology import CHAT_EVENTS_EXCHANGE, declare_topology, declared_queues
from messaging.wire import task_message_build


@pytest.mark.parametrize("event", RELAYED_EVENTS, ids=lambda event: event.routing_key)
def test_every_relayed_event_has_a_registered_task_routed_to_its_queue(event: EventType):
    app.loader.import_default_modules()
    assert event.task_name in app.tasks, f"no Celery task {event.task_name} is registered"
    assert settings.CELERY_TASK_ROUTES[event.task_name] == {"queue": event.queue_name}
    assert app.amqp.router.route({}, event.task_name)["queue"].name == event.queue_name
    assert event.queue_name in {queue.name for queue in declared_queues()}


def test_every_routed_task_is_registered():
    app.loader.import_default_modules()
    assert sorted(set(task_routes()) - set(app.tasks)) == []


@pytest.mark.broker
def test_every_relayed_event_reaches_its_queue_through_the_bindings(scratch_broker_url):
    with Connection(scratch_broker_url) as conn:
        declare_topology(conn)
        channel = conn.default_channel
        for event in RELAYED_EVENTS:
            message = task_message_build(routing_key=event.routing_key, rows=[(1, {})]).message
            channel.basic_publish_confirm(
                message, exchange=CHAT_EVENTS_EXCHANGE.name, routing_key=event.routing_key, mandatory=True
            )
        ready = {
            queue.name: channel.queue_declare(queue.name, passive=True).message_count
            for queue in declared_queues()
        }
    expected = {queue.name: 0 for queue in declared_queues()}
    for event in RELAYED_EVENTS:
        expected[event.queue_name] += 1
    assert ready == expected


def test_message_created_payload_from_its_builder_parses():
    event_id = uuid.uuid4()
    created_at = datetime(2026, 3, 1, 12, 30, 15, 250, tzinfo=UTC)
    payload = message_created_payload(
        event_id=event_id, room_id=3, room="general", author_id=7, message_id=11, seq=2, created_at=created_at
    )

    assert set(payload) == set(MessageCreatedPayload.__annotations__)
    assert MESSAGE_CREATED.parse_batch([payload]) == [
        MessageCreated(event_id=event_id, message_id=11, room_id=3, author_id=7, created_at=created_at)
    ]


def test_mention_payload_from_its_builder_parses():
    event_id = uuid.uuid4()
    queued_at = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    expires_at = queued_at + timedelta(minutes=10)
    payload = event_envelope(
        routing_key=MENTION.routing_key,
        event_id=event_id,
        fields=mention_fields(
            user_id=5,
            message_id=11,
            room_id=3,
            author_id=7,
            priority=PRIORITY_HIGH,
            queued_at=queued_at,
            expires_at=expires_at,
        ),
    )

    assert set(payload) == set(MentionPayload.__annotations__)
    assert MENTION.parse_batch([payload]) == [
        Mention(
            notification_id=event_id,
            user_id=5,
            message_id=11,
            priority=PRIORITY_HIGH,
            queued_at=queued_at,
            expires_at=expires_at,
        )
    ]


@pytest.mark.parametrize("event", RELAYED_EVENTS, ids=lambda event: event.routing_key)
@pytest.mark.parametrize("events", [None, "events", {"event_id": "x"}, [1]])
def test_a_task_argument_that_is_not_a_list_of_payloads_is_invalid(event: EventType, events):
    with pytest.raises(InvalidEvent):
        event.parse_batch(events)


@pytest.mark.parametrize("event", RELAYED_EVENTS, ids=lambda event: event.routing_key)
def test_every_event_task_dead_letters_an_invalid_payload_without_retrying(event: EventType):
    app.loader.import_default_modules()
    task = app.tasks[event.task_name]
    assert isinstance(task, DeadLetteringTask)
    assert task.retry_jitter is True and task.retry_backoff >= 1

    with pytest.raises(Reject) as rejected:
        task("not a list of events")
    assert rejected.value.requeue is False
    assert isinstance(rejected.value.__cause__, InvalidEvent)
