"""The analytics tasks on a real worker: a database outage is retried with backoff, never
dead-lettered; the ledger prune Celery beat sends runs there."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import InterfaceError, OperationalError
from django.utils import timezone
from kombu import Connection

from analytics import selectors
from analytics.models import ProcessedEvent
from analytics.services import EventsPastLedgerHorizon, chat_events_record
from analytics.tasks import record_chat_events
from chatproject.celery import app
from messaging.events import InvalidEvent
from messaging.retrying import DeadLetteringTask
from tests.analytics.test_dead_letters import dead_letter_task_ids, publish_task
from tests.analytics.test_services import chat_event
from tests.harness import wait_until


def test_record_chat_events_retries_database_errors_with_celerys_backoff_and_full_jitter(settings):
    assert isinstance(record_chat_events, DeadLetteringTask)
    assert set(record_chat_events.autoretry_for) == {OperationalError, InterfaceError}
    assert set(record_chat_events.reject_for) == {InvalidEvent, EventsPastLedgerHorizon}
    assert (
        record_chat_events.max_retries,
        record_chat_events.retry_backoff,
        record_chat_events.retry_backoff_max,
        record_chat_events.retry_jitter,
    ) == (
        settings.ANALYTICS_RETRY_MAX,
        settings.ANALYTICS_RETRY_BASE_DELAY,
        settings.ANALYTICS_RETRY_MAX_DELAY,
        True,
    )


@pytest.mark.django_db
def test_record_chat_events_runs_out_of_retries_then_fails(monkeypatch):
    attempts = []

    def database_down(*, events):
        attempts.append(events)
        raise OperationalError("connection refused")

    monkeypatch.setattr("analytics.tasks.chat_events_record", database_down)
    # Eager apply runs the retries inline (no countdown wait); the last error then propagates.
    result = record_chat_events.apply(args=[[]])

    assert result.state == "FAILURE" and isinstance(result.result, OperationalError)
    assert len(attempts) == record_chat_events.max_retries + 1


@pytest.mark.broker
def test_database_outage_is_retried_then_counted_once_it_is_back(
    broker_url, start_worker, make_user, make_room
):
    alice = make_user("alice")
    room = make_room("general")
    cut_off = start_worker(
        # Nothing listens on port 1: every query fails like a stopped PostgreSQL.
        DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere",
        # Retries 0 or 1 s apart, more than the test waits for: it stops the worker after 3.
        ANALYTICS_RETRY_MAX="100",
        ANALYTICS_RETRY_BASE_DELAY="1",
        ANALYTICS_RETRY_MAX_DELAY="1",
    )
    events = [chat_event(room=room, author=alice, message_id=i) for i in range(1, 4)]
    with Connection(broker_url) as broker:
        task_id = publish_task(broker, args=[events])
        wait_until(
            lambda: cut_off.log_text().count(f"[{task_id}] retry:") >= 3,
            timeout=60,
            message=f"the task was not retried; log:\n{cut_off.log_text()[-2000:]}",
        )
        cut_off.stop()  # its scheduled retry goes back to the queue unacked

        start_worker()
        wait_until(
            lambda: selectors.room_message_count(room_id=room.pk) == 3,
            timeout=60,
            message="the retried batch was not counted once the database was back",
        )
        assert task_id not in dead_letter_task_ids(broker)


@pytest.mark.broker
def test_beat_entry_for_the_ledger_prune_runs_on_the_analytics_worker(
    broker_url, start_worker, make_user, make_room, settings
):
    alice = make_user("alice")
    room = make_room("general")
    old, recent = (chat_event(room=room, author=alice, message_id=i) for i in (1, 2))
    chat_events_record(events=[old, recent])
    ProcessedEvent.objects.filter(event_id=old["event_id"]).update(
        processed_at=timezone.now() - timedelta(days=settings.ANALYTICS_LEDGER_RETENTION_DAYS + 1)
    )
    worker = start_worker()

    # What beat sends for the entry (celery.beat.Scheduler.apply_async), routed like it.
    entry = settings.CELERY_BEAT_SCHEDULE["analytics-prune-processed-events"]
    app.send_task(entry["task"], **entry["options"])

    wait_until(
        lambda: "pruned 1 analytics ledger rows" in worker.log_text(),
        timeout=60,
        message=f"the analytics worker did not prune; log:\n{worker.log_text()[-2000:]}",
    )
    assert [str(event_id) for event_id in ProcessedEvent.objects.values_list("event_id", flat=True)] == [
        recent["event_id"]
    ]
