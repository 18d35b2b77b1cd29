"""The outbox relay's services against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from kombu import Connection, Exchange, Queue

from messaging.events import EVENT_TASKS, MESSAGE_CREATED
from messaging.listening import OutboxListener
from messaging.models import OutboxEvent
from messaging.outbox import (
    outbox_event_add,
    prune_sent_events,
    unroutable_pending_events,
)
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.relay import UnroutableEvents
from messaging.topology import CHAT_EVENTS_EXCHANGE

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def publisher(broker_url):
    publisher = EventPublisher(broker_url)
    yield publisher
    publisher.close()


@pytest.fixture
def listener():
    listener = OutboxListener()
    listener.connect()
    yield listener
    listener.close()


def test_outbox_insert_wakes_the_listener_when_its_transaction_commits(listener):
    with transaction.atomic():
        outbox_event_add(routing_key=MESSAGE_CREATED.routing_key, payload={"message_id": 1})
        assert listener.wait(timeout=0.3) is False

    assert listener.wait(timeout=10) is True


def test_rolled_back_outbox_insert_wakes_nobody(listener):
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox_event_add(routing_key=MESSAGE_CREATED.routing_key, payload={"message_id": 1})
        raise RuntimeError("the message write failed")

    assert listener.wait(timeout=0.5) is False


def test_relay_publishes_pending_events_and_marks_them_sent(send_messages, publisher, probe_queue):
    events = send_messages(3)

    result = publish_pending_events(publisher=publisher)

    assert result.sent == 3
    assert OutboxEvent.objects.filter(sent_at__isnull=True).count() == 0
    [message] = probe_queue.drain()
    assert [e["event_id"] for e in message.events] == [str(e.event_id) for e in events]
    assert [e["message_id"] for e in message.events] == [e.payload["message_id"] for e in events]


def test_published_event_is_a_persistent_celery_task_message(send_messages, publisher, probe_queue):
    send_messages(1)

    publish_pending_events(publisher=publisher)

    [message] = probe_queue.drain()
    assert message.headers["task"] == EVENT_TASKS["chat.message.created"]
    assert message.headers["id"] == message.properties["correlation_id"]
    assert message.properties["delivery_mode"] == 2
    assert message.properties["content_type"] == "application/json"


def test_events_are_batched_into_task_messages_of_batch_size(send_messages, publisher, probe_queue):
    send_messages(5)

    result = publish_pending_events(publisher=publisher, batch_size=2)

    assert (result.sent, result.messages) == (5, 3)
    assert [len(m.events) for m in probe_queue.drain()] == [2, 2, 1]


def test_sent_events_are_not_published_again(send_messages, publisher, probe_queue):
    send_messages(2)
    publish_pending_events(publisher=publisher)

    result = publish_pending_events(publisher=publisher)

    assert result.selected == 0
    assert len(probe_queue.drain()) == 1


def test_unroutable_events_stay_pending(send_messages, scratch_broker_url):
    # An exchange with no queue bound: the broker confirms, but returns the mandatory message.
    with Connection(scratch_broker_url) as conn:
        Exchange(CHAT_EVENTS_EXCHANGE.name, type="topic", durable=True).bind(conn.default_channel).declare()
    send_messages(2)
    publisher = EventPublisher(scratch_broker_url, declare=False)
    try:
        result = publish_pending_events(publisher=publisher)
    finally:
        publisher.close()

    assert (result.selected, result.sent) == (2, 0)
    assert OutboxEvent.objects.filter(sent_at__isnull=True).count() == 2


def test_events_no_task_consumes_stay_pending_and_are_counted_by_routing_key(
    send_messages, publisher, probe_queue
):
    [routable] = send_messages(1)
    with transaction.atomic():
        for _ in range(2):
            outbox_event_add(routing_key="chat.renamed", payload={})

    result = publish_pending_events(publisher=publisher)

    assert result.sent == 1
    assert [e["event_id"] for m in probe_queue.drain() for e in m.events] == [str(routable.event_id)]
    assert OutboxEvent.objects.filter(sent_at__isnull=True).count() == 2
    assert unroutable_pending_events() == {"chat.renamed": 2}


def test_relay_log_names_each_unroutable_routing_key_once_while_it_stays_pending(caplog):
    unroutable = UnroutableEvents()

    with caplog.at_level(logging.INFO, logger="messaging.relay"):
        unroutable.report({"chat.renamed": 2})
        unroutable.report({"chat.renamed": 3, "chat.typo": 1})
        unroutable.report({"chat.typo": 1})

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            "2 outbox events with routing key 'chat.renamed' stay pending: no task consumes it "
            "(EVENT_TASKS in messaging/events.py); they are kept, not published, until one does",
        ),
        (
            "ERROR",
            "1 outbox events with routing key 'chat.typo' stay pending: no task consumes it "
            "(EVENT_TASKS in messaging/events.py); they are kept, not published, until one does",
        ),
        ("INFO", "no outbox events with routing key 'chat.renamed' are pending any more"),
    ]


def test_nacked_events_stay_pending(send_messages, scratch_broker_url):
    # A full queue that rejects overflow nacks the publish.
    with Connection(scratch_broker_url) as conn:
        channel = conn.default_channel
        Exchange(CHAT_EVENTS_EXCHANGE.name, type="topic", durable=True).bind(channel).declare()
        Queue(
            "full",
            exchange=CHAT_EVENTS_EXCHANGE,
            routing_key="#",
            queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        ).bind(channel).declare()
    send_messages(1)
    publisher = EventPublisher(scratch_broker_url, declare=False)
    try:
        result = publish_pending_events(publisher=publisher)
    finally:
        publisher.close()

    assert (result.selected, result.sent) == (1, 0)
    assert OutboxEvent.objects.filter(sent_at__isnull=True).count() == 1


def test_prune_removes_only_old_sent_events(send_messages):
    old_sent, recent_sent, old_pending = send_messages(3)
    now = timezone.now()
    OutboxEvent.objects.filter(pk=old_sent.pk).update(sent_at=now - timedelta(days=8))
    OutboxEvent.objects.filter(pk=recent_sent.pk).update(sent_at=now - timedelta(days=6))
    OutboxEvent.objects.filter(pk=old_pending.pk).update(created_at=now - timedelta(days=30))

    deleted = prune_sent_events(older_than=timedelta(days=7))

    assert deleted == 1
    assert set(OutboxEvent.objects.values_list("pk", flat=True)) == {recent_sent.pk, old_pending.pk}


def test_prune_deletes_in_chunks_until_every_old_sent_event_is_gone(send_messages, monkeypatch):
    monkeypatch.setattr("infrastructure.postgres.DELETE_CHUNK", 2)
    send_messages(5)
    OutboxEvent.objects.update(sent_at=timezone.now() - timedelta(days=8))

    # The relay passes its broker keep-alive here: it must run between chunks, not only at the end.
    left_after_each_chunk = []
    deleted = prune_sent_events(
        older_than=timedelta(days=7),
        between_chunks=lambda: left_after_each_chunk.append(OutboxEvent.objects.count()),
    )

    assert deleted == 5
    assert not OutboxEvent.objects.exists()
    assert left_after_each_chunk == [3, 1]
