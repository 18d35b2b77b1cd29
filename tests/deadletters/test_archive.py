"""Messages that fail for good end up archived with their reason, through real processes."""

from __future__ import annotations

import os
import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone
from kombu import Connection, Queue

from deadletters.models import DeadLetter
from deadletters.services.resolution import replay_message
from messaging.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE
from messaging.wire import task_message_build
from tests.deadletters.conftest import (
    REFUSED_HEADER,
    analytics_task_message,
    archive_letter,
    chat_event,
    log_text,
    publish,
    queue_depth,
    wait_for_log,
)
from tests.harness import wait_until

pytestmark = pytest.mark.broker


def _archived(**filters) -> DeadLetter | None:
    return DeadLetter.objects.filter(**filters).first()


def test_invalid_analytics_payload_is_archived_with_its_error(
    broker_url, start_worker, start_archiver, admin_client
):
    start_worker()
    start_archiver()
    message = analytics_task_message([{"type": "chat.message.created", "event_id": "not-a-uuid"}])
    task_id = message.properties["correlation_id"]
    publish(broker_url, message)

    letter = wait_until(
        lambda: _archived(task_id=task_id, error_class__endswith="InvalidEvent"),
        timeout=60,
        message="the invalid batch was not archived with its error",
    )
    assert letter.reason == "rejected"
    assert letter.origin_queue == "analytics"
    assert letter.task_name == "analytics.record_chat_events"
    assert "event_id must be a UUID" in letter.error_message
    assert "InvalidEvent" in letter.traceback
    assert letter.attempts == 1
    changelist = admin_client.get(reverse("admin:deadletters_deadletter_changelist"))
    assert "InvalidEvent: event_id must be a UUID" in changelist.content.decode()


def test_unknown_task_is_archived_with_not_registered_error(broker_url, start_worker, start_archiver):
    start_worker()
    start_archiver()
    message = analytics_task_message([])
    # Same message, but naming a task no worker has.
    message.properties["application_headers"]["task"] = "analytics.no_such_task"
    task_id = message.properties["correlation_id"]
    publish(broker_url, message)

    letter = wait_until(
        lambda: _archived(task_id=task_id, error_class__endswith="NotRegistered"),
        timeout=60,
        message="the unknown task was not archived with its error",
    )
    assert letter.task_name == "analytics.no_such_task"
    assert "no task named 'analytics.no_such_task'" in letter.error_message


def test_expired_message_is_archived_with_reason_expired(broker_url, start_archiver):
    # No worker consumes `analytics` here, so the message's own TTL runs out in the queue.
    start_archiver()
    message = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=50)
    task_id = message.properties["correlation_id"]
    publish(broker_url, message)

    letter = wait_until(
        lambda: _archived(task_id=task_id), timeout=60, message="the expired message was not archived"
    )
    assert letter.reason == "expired"
    assert letter.origin_queue == "analytics"
    assert letter.error_class == ""
    assert "TTL of 50 ms ran out" in letter.error_message
    assert letter.x_death[0]["original-expiration"] == "50"


def test_overflowed_message_is_archived_with_reason_maxlen(broker_url, start_archiver):
    bounded = Queue(
        "dlq_test_bounded",
        routing_key="dlq_test_bounded",
        durable=True,
        queue_arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name, "x-max-length": 1},
    )
    with Connection(broker_url) as conn:
        bounded.bind(conn.default_channel).declare()
    start_archiver()
    first = analytics_task_message([chat_event(room_id=1, author_id=1)])
    second = analytics_task_message([chat_event(room_id=1, author_id=1)])
    # Default overflow (drop-head): the older message is dead-lettered to make room.
    publish(broker_url, first, exchange="", routing_key=bounded.name)
    publish(broker_url, second, exchange="", routing_key=bounded.name)

    letter = wait_until(
        lambda: _archived(task_id=first.properties["correlation_id"]),
        timeout=60,
        message="the overflowed message was not archived",
    )
    assert letter.reason == "maxlen"
    assert letter.origin_queue == bounded.name
    assert queue_depth(broker_url, bounded.name) == 1


def test_expired_mention_notification_is_archived_with_reason_expired(broker_url, start_archiver):
    # The relay turns a notification's `expires_at` into the message's TTL; with no notifier
    # running, RabbitMQ dead-letters it when that passes.
    start_archiver()
    now = datetime.now(UTC)
    notification = {
        "type": "chat.mention",
        "event_id": str(uuid.uuid4()),
        "user_id": 1,
        "message_id": 1,
        "queued_at": now.isoformat(),
        "expires_at": now.isoformat(),
    }
    message = task_message_build(routing_key="chat.mention", rows=[(1, notification)]).message
    publish(broker_url, message, routing_key="chat.mention")

    letter = wait_until(
        lambda: _archived(task_id=message.properties["correlation_id"]),
        timeout=60,
        message="the expired notification was not archived",
    )
    assert (letter.origin_queue, letter.reason) == ("notifications", "expired")
    assert letter.task_name == "chat.deliver_mention_notifications"


def test_undecodable_task_body_is_archived_byte_for_byte(broker_url, start_worker, start_archiver):
    start_worker()
    start_archiver()
    message = analytics_task_message([])
    message.body = b"\xff\xfe{not json"
    task_id = message.properties["correlation_id"]
    publish(broker_url, message)

    letter = wait_until(
        lambda: _archived(task_id=task_id), timeout=60, message="the undecodable message was not archived"
    )
    assert letter.reason == "rejected"
    assert letter.error_class == "kombu.exceptions.DecodeError"
    assert "cannot be decoded as JSON" in letter.error_message
    assert letter.body_encoding == DeadLetter.BodyEncoding.BASE64
    assert replay_message(letter)[0] == b"\xff\xfe{not json"


def test_retries_exhausted_while_the_database_is_down_still_archive_the_error(
    broker_url, start_worker, start_archiver
):
    # The worker's database is unreachable: every attempt fails, and so would a TaskFailure row;
    # the failure details reach the archiver through the broker instead.
    start_worker(
        DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere",
        ANALYTICS_RETRY_MAX="1",
        ANALYTICS_RETRY_BASE_DELAY="1",
        ANALYTICS_RETRY_MAX_DELAY="0",  # the one retry at once
    )
    start_archiver()
    message = analytics_task_message([chat_event(room_id=1, author_id=1)])
    task_id = message.properties["correlation_id"]
    publish(broker_url, message)

    letter = wait_until(
        lambda: _archived(task_id=task_id, error_class__endswith="OperationalError"),
        timeout=90,
        message="the exhausted task was not archived with its error",
    )
    assert letter.reason == "rejected"
    assert letter.attempts == 2
    assert "127.0.0.1" in letter.error_message
    assert "OperationalError" in letter.traceback


def test_archiver_prunes_resolved_dead_letters_past_the_retention(broker_url, start_archiver, settings):
    long_ago = timezone.now() - timedelta(days=settings.DLQ_RESOLVED_RETENTION_DAYS + 1)
    discarded, unresolved = archive_letter(), archive_letter()
    DeadLetter.objects.filter(pk=discarded.pk).update(status=DeadLetter.Status.DISCARDED, updated_at=long_ago)
    DeadLetter.objects.filter(pk=unresolved.pk).update(updated_at=long_ago, archived_at=long_ago)

    archiver = start_archiver()

    wait_until(
        lambda: not DeadLetter.objects.filter(pk=discarded.pk).exists(),
        timeout=60,
        message="the archiver did not prune the old discarded letter",
    )
    assert DeadLetter.objects.filter(pk=unresolved.pk).exists()
    wait_until(
        lambda: "pruned 1 resolved dead letters" in Path(archiver.log_path).read_text(),
        timeout=10,
        message="the prune was not logged",
    )


def test_a_letter_the_database_refuses_is_archived_minimal_and_the_rest_are_not_held_back(
    broker_url, start_archiver
):
    marker = f"poison-{uuid.uuid4().hex}"
    poison = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
    # Too long for the task_name column: the INSERT of its full row fails, whenever it is tried.
    poison.properties["application_headers"]["task"] = f"analytics.{marker}" * 10
    publish(broker_url, poison)
    good = [analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0) for _ in range(3)]
    for message in good:
        publish(broker_url, message)
    wait_until(
        lambda: queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == 4,
        timeout=60,
        message="the expired messages did not all reach dead_letters",
    )

    archiver = start_archiver()
    wait_until(
        lambda: DeadLetter.objects.count() == 4 and queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == 0,
        timeout=60,
        message="the poison held back the other letters",
    )
    for message in good:
        letter = DeadLetter.objects.get(task_id=message.properties["correlation_id"])
        assert (letter.reason, letter.body_encoding) == ("expired", DeadLetter.BodyEncoding.UTF8)
    minimal = DeadLetter.objects.get(task_id=poison.properties["correlation_id"])
    assert minimal.error_class == "django.db.utils.DataError"
    assert replay_message(minimal)[0] == poison.body.encode()
    wait_for_log(archiver, f"dead letter #{minimal.pk} archived in minimal form")
    assert marker not in log_text(archiver)


def test_a_letter_no_row_can_hold_is_held_without_looping_and_archived_after_a_restart(
    broker_url, start_archiver, refuse_dead_letters
):
    refuse_dead_letters("P0001")
    refused = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
    refused.properties["application_headers"][REFUSED_HEADER] = 1
    publish(broker_url, refused)
    good = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
    publish(broker_url, good)

    archiver = start_archiver(DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS="3600")
    wait_until(
        lambda: _archived(task_id=good.properties["correlation_id"]),
        timeout=60,
        message="the unstorable letter held back the other one",
    )
    wait_for_log(archiver, "holding 1 dead letters that could not be stored at all")
    more = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
    publish(broker_url, more)
    wait_until(
        lambda: _archived(task_id=more.properties["correlation_id"]),
        timeout=60,
        message="a letter that came after the unstorable one was not archived",
    )
    # Tried once, then held unacked: not requeued in a loop, not dropped.
    assert log_text(archiver).count("not even in minimal form") == 1
    assert queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == 0

    refuse_dead_letters(None)
    os.killpg(archiver.pid, signal.SIGKILL)
    archiver.wait()
    start_archiver()
    letter = wait_until(
        lambda: _archived(task_id=refused.properties["correlation_id"]),
        timeout=60,
        message="the held letter was lost",
    )
    assert letter.body_encoding == DeadLetter.BodyEncoding.UTF8  # stored in full now
    assert DeadLetter.objects.count() == 3


def test_a_held_letter_is_tried_again_after_the_retry_interval(
    broker_url, start_archiver, refuse_dead_letters
):
    refuse_dead_letters("P0001")
    refused = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
    refused.properties["application_headers"][REFUSED_HEADER] = 1
    publish(broker_url, refused)

    archiver = start_archiver(DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS="1")
    wait_for_log(archiver, "holding 1 dead letters that could not be stored at all")
    refuse_dead_letters(None)
    wait_until(
        lambda: _archived(task_id=refused.properties["correlation_id"]),
        timeout=60,
        message="the held letter was not tried again",
    )
    assert "handed 1 unstorable dead letters back to the queue" in log_text(archiver)
    assert DeadLetter.objects.count() == 1
