"""The analytics tasks on a real worker: a database outage is retried with backoff, never
dead-lettered; the ledger prune Celery beat sends runs there."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from kombu import Connection

from analytics import selectors
from analytics.models import ProcessedEvent
from analytics.services import chat_events_record
from analytics.tasks import retry_delay
from chatproject.celery import app
from tests.analytics.test_dead_letters import dead_letter_task_ids, publish_task
from tests.analytics.test_services import chat_event
from tests.harness import wait_until


def test_retry_delay_grows_exponentially_with_jitter_up_to_the_cap(settings):
    settings.ANALYTICS_RETRY_BASE_DELAY = 1.0
    settings.ANALYTICS_RETRY_MAX_DELAY = 60.0
    for retries, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (5, 32.0), (6, 60.0), (20, 60.0)]:
        delays = {retry_delay(retries) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1, "jitter spreads the retries of concurrent workers"


@pytest.mark.broker
def test_database_outage_is_retried_then_counted_once_it_is_back(
    broker_url, start_worker, make_user, make_room
):
    alice = make_user("alice")
    room = make_room("general")
    cut_off = start_worker(
        # Nothing listens on port 1: every query fails like a stopped PostgreSQL.
        DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere",
        ANALYTICS_RETRY_BASE_DELAY="0.2",
        ANALYTICS_RETRY_MAX_DELAY="0.5",
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
