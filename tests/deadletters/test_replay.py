"""Replaying dead letters through the real broker and worker: once in effect, however often replayed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone
from kombu import Connection

from analytics import selectors as analytics_selectors
from analytics import services as analytics_services
from analytics.models import ProcessedEvent
from deadletters.models import DeadLetter, DeadLetterAction
from deadletters.services.resolution import REPLAY_HEADER, dead_letter_replay, replay_publisher
from tests.deadletters.conftest import analytics_task_message, archive_letter, chat_event, log_text, publish
from tests.harness import wait_until

pytestmark = pytest.mark.broker


def _expired_letter(broker_url, events) -> DeadLetter:
    message = analytics_task_message(events, expiration_ms=0)
    publish(broker_url, message)
    return wait_until(
        lambda: DeadLetter.objects.filter(task_id=message.properties["correlation_id"]).first(),
        timeout=60,
        message="the expired batch was not archived",
    )


def test_replay_after_the_fix_counts_the_event_once_however_often(
    broker_url, make_user, make_room, start_archiver, start_worker
):
    alice = make_user("alice")
    room = make_room("general")
    start_archiver()
    # The cause: no worker was consuming, so the batch expired in the queue.
    letter = _expired_letter(broker_url, [chat_event(room_id=room.pk, author_id=alice.pk)])
    assert letter.reason == "expired"

    worker = start_worker()  # the fix
    dead_letter_replay(dead_letters=[letter], actor_label="test")
    wait_until(
        lambda: analytics_selectors.room_message_count(room_id=room.pk) == 1,
        timeout=60,
        message="the replayed event was not counted",
    )

    dead_letter_replay(dead_letters=[DeadLetter.objects.get(pk=letter.pk)], actor_label="test")
    wait_until(
        lambda: f"{letter.task_id}] succeeded" in log_text(worker) and "'duplicates': 1" in log_text(worker),
        timeout=60,
        message="the second replay was not processed",
    )
    assert analytics_selectors.room_message_count(room_id=room.pk) == 1
    letter.refresh_from_db()
    assert (letter.status, letter.replay_count) == (DeadLetter.Status.REPLAYED, 2)


def test_replay_after_the_ledger_was_pruned_counts_nothing_twice_and_says_why(
    broker_url, make_user, make_room, start_archiver, start_worker, settings
):
    alice = make_user("alice")
    room = make_room("general")
    retention = settings.ANALYTICS_LEDGER_RETENTION_DAYS
    event = chat_event(room_id=room.pk, author_id=alice.pk)
    event["created_at"] = (datetime.now(UTC) - timedelta(days=retention + 10)).isoformat()
    # Weeks ago: the event was counted, and a second copy of its batch was dead-lettered.
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = retention + 100
    analytics_services.chat_events_record(events=[event])
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = retention
    ProcessedEvent.objects.update(processed_at=timezone.now() - timedelta(days=retention + 10))
    start_archiver()
    letter = _expired_letter(broker_url, [event])
    # Since then, the hourly prune removed the event's ledger row.
    assert analytics_services.processed_events_prune() == 1

    start_worker()
    result = dead_letter_replay(dead_letters=[letter], actor_label="cli:ops")

    assert result.done == [letter.pk]
    refused = wait_until(
        lambda: DeadLetter.objects.exclude(pk=letter.pk).filter(task_id=letter.task_id).first(),
        timeout=60,
        message="the replayed batch was not dead-lettered again",
    )
    assert refused.headers[REPLAY_HEADER] == letter.pk
    assert refused.error_class == "analytics.services.EventsPastLedgerHorizon"
    assert "could count them twice" in refused.error_message
    assert analytics_selectors.room_message_count(room_id=room.pk) == 1


def test_replay_republishes_to_the_origin_without_the_death_history(broker_url, start_archiver):
    start_archiver()
    letter = _expired_letter(broker_url, [chat_event(room_id=1, author_id=1)])

    result = dead_letter_replay(dead_letters=[letter], actor_label="cli:ops")

    assert result.done == [letter.pk]
    with Connection(broker_url) as conn:
        replayed = conn.default_channel.basic_get("analytics", no_ack=True)
    assert replayed is not None
    headers = replayed.properties["application_headers"]
    assert "x-death" not in headers
    assert headers["id"] == letter.task_id
    assert headers[REPLAY_HEADER] == letter.pk
    assert replayed.delivery_info["exchange"] == "chat_events"
    assert replayed.delivery_info["routing_key"] == "chat.message.created"
    assert replayed.properties["delivery_mode"] == 2
    letter.refresh_from_db()
    assert (letter.status, letter.replay_count) == (DeadLetter.Status.REPLAYED, 1)
    assert list(DeadLetterAction.objects.values_list("kind", "actor_label")) == [("replayed", "cli:ops")]


def test_replay_that_no_queue_would_receive_fails_and_leaves_the_letter_new(broker_url, db):
    letter = archive_letter()
    DeadLetter.objects.filter(pk=letter.pk).update(routing_key="nothing.is.bound.here")
    letter.refresh_from_db()

    result = dead_letter_replay(dead_letters=[letter], actor_label="test")

    assert letter.pk in result.failed
    assert "no queue is bound" in result.failed[letter.pk]
    letter.refresh_from_db()
    assert (letter.status, letter.replay_count) == (DeadLetter.Status.NEW, 0)
    assert not DeadLetterAction.objects.exists()


def test_replay_while_rabbitmq_is_unreachable_fails_and_leaves_the_letter_new(db):
    letter = archive_letter()

    result = dead_letter_replay(
        dead_letters=[letter],
        actor_label="test",
        publisher=replay_publisher("amqp://guest:guest@127.0.0.1:1//"),
    )

    assert "broker unreachable" in result.failed[letter.pk]
    letter.refresh_from_db()
    assert (letter.status, letter.replay_count) == (DeadLetter.Status.NEW, 0)
