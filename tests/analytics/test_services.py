import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from analytics import selectors, services
from analytics.models import LedgerPrune, ProcessedEvent, RoomDayUserCount, RoomMinuteCount, UserMessageCount
from bench.procfile import ROOT, child_process_env
from messaging.events import InvalidEvent
from tests.harness import wait_until


def chat_event(*, room, author, message_id: int, created_at: datetime | None = None) -> dict:
    """The outbox payload chat.services.message_create writes, as the relay publishes it."""
    return {
        "event_id": str(uuid.uuid4()),
        "type": "chat.message.created",
        "message_id": message_id,
        "room_id": room.pk,
        "room": room.slug,
        "author_id": author.pk,
        "seq": message_id,
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
    }


def aggregates_snapshot() -> tuple:
    return (
        sorted(RoomMinuteCount.objects.values_list("room_id", "minute", "count")),
        sorted(RoomDayUserCount.objects.values_list("room_id", "day", "user_id", "count")),
        sorted(UserMessageCount.objects.values_list("user_id", "count")),
        ProcessedEvent.objects.count(),
    )


@pytest.mark.django_db
def test_batch_is_counted_per_room_minute_user_and_day(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    general, random = make_room("general"), make_room("random")
    # A fixed minute of yesterday: recent enough to count (events past the ledger horizon do not).
    minute = (datetime.now(UTC) - timedelta(days=1)).replace(hour=10, minute=15, second=0, microsecond=0)
    events = [
        chat_event(room=general, author=alice, message_id=1, created_at=minute.replace(second=1)),
        chat_event(room=general, author=bob, message_id=2, created_at=minute.replace(second=59)),
        chat_event(room=general, author=alice, message_id=3, created_at=minute.replace(minute=16)),
        chat_event(room=random, author=alice, message_id=4, created_at=minute),
    ]

    result = services.chat_events_record(events=events)

    assert result == services.RecordResult(counted=4, duplicates=0)
    assert selectors.room_message_count(room_id=general.pk) == 3
    assert selectors.room_message_count(room_id=random.pk) == 1
    assert dict(RoomMinuteCount.objects.filter(room=general).values_list("minute", "count")) == {
        minute: 2,
        minute.replace(minute=16): 1,
    }
    assert selectors.room_active_users(room_id=general.pk, day=minute.date()) == 2
    assert dict(UserMessageCount.objects.values_list("user_id", "count")) == {alice.pk: 3, bob.pk: 1}


@pytest.mark.django_db
def test_same_batch_twice_counts_once(make_user, make_room):
    alice = make_user("alice")
    general = make_room("general")
    events = [chat_event(room=general, author=alice, message_id=i) for i in range(1, 6)]
    services.chat_events_record(events=events)
    before = aggregates_snapshot()

    again = services.chat_events_record(events=events)

    assert again == services.RecordResult(counted=0, duplicates=5)
    assert aggregates_snapshot() == before
    assert selectors.room_message_count(room_id=general.pk) == 5


@pytest.mark.django_db
def test_event_repeated_within_one_batch_counts_once(make_user, make_room):
    alice = make_user("alice")
    general = make_room("general")
    event = chat_event(room=general, author=alice, message_id=1)

    services.chat_events_record(events=[event, dict(event)])

    assert selectors.room_message_count(room_id=general.pk) == 1


@pytest.mark.django_db
def test_overlapping_batch_counts_only_new_events(make_user, make_room):
    alice = make_user("alice")
    general = make_room("general")
    events = [chat_event(room=general, author=alice, message_id=i) for i in range(1, 5)]
    services.chat_events_record(events=events[:3])

    result = services.chat_events_record(events=events[1:])

    assert result == services.RecordResult(counted=1, duplicates=2)
    assert selectors.room_message_count(room_id=general.pk) == 4
    assert UserMessageCount.objects.get(user=alice).count == 4


@pytest.mark.parametrize(
    "breakage",
    [
        {"event_id": "not-a-uuid"},
        {"type": "chat.message.deleted"},
        {"room_id": "7"},
        {"author_id": True},
        {"message_id": -1},
        {"created_at": "yesterday"},
        {"created_at": "2026-11-27T10:00:00"},  # no time zone
    ],
)
@pytest.mark.django_db
def test_invalid_event_raises_and_changes_nothing(make_user, make_room, breakage):
    alice = make_user("alice")
    general = make_room("general")
    valid = chat_event(room=general, author=alice, message_id=1)
    broken = {**chat_event(room=general, author=alice, message_id=2), **breakage}

    with pytest.raises(InvalidEvent):
        services.chat_events_record(events=[valid, broken])

    assert aggregates_snapshot() == ([], [], [], 0)


@pytest.mark.parametrize("payload", [None, "events", {"event_id": "x"}, [1, 2]])
@pytest.mark.django_db
def test_payload_that_is_not_a_list_of_events_raises_invalid_event(payload):
    with pytest.raises(InvalidEvent):
        services.chat_events_record(events=payload)


@pytest.mark.django_db
def test_ledger_keeps_created_and_processed_times_for_lag(make_user, make_room):
    alice = make_user("alice")
    general = make_room("general")
    created_at = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
    event = chat_event(room=general, author=alice, message_id=1, created_at=created_at)

    services.chat_events_record(events=[event])

    row = ProcessedEvent.objects.get(event_id=event["event_id"])
    assert row.created_at == created_at
    assert row.processed_at >= created_at


# --- the ledger's retention ---------------------------------------------------------------------


def _count_events_counted_days_ago(events: list[dict], *, days: float, settings) -> None:
    """Count `events` as the worker did `days` ago: within the retention then, backdated now."""
    retention = settings.ANALYTICS_LEDGER_RETENTION_DAYS
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 3650
    services.chat_events_record(events=events)
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = retention
    ProcessedEvent.objects.filter(event_id__in=[e["event_id"] for e in events]).update(
        processed_at=timezone.now() - timedelta(days=days)
    )


@pytest.mark.django_db
def test_ledger_rows_counted_before_the_retention_are_pruned_and_recent_ones_stay(
    make_user, make_room, settings
):
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 30
    alice = make_user("alice")
    general = make_room("general")
    old = chat_event(
        room=general, author=alice, message_id=1, created_at=datetime.now(UTC) - timedelta(days=31)
    )
    recent = chat_event(
        room=general, author=alice, message_id=2, created_at=datetime.now(UTC) - timedelta(days=29)
    )
    _count_events_counted_days_ago([old], days=31, settings=settings)
    _count_events_counted_days_ago([recent], days=29, settings=settings)

    assert services.processed_events_prune() == 1

    assert list(ProcessedEvent.objects.values_list("event_id", flat=True)) == [uuid.UUID(recent["event_id"])]
    assert selectors.room_message_count(room_id=general.pk) == 2, "pruning the ledger keeps the counts"


@pytest.mark.django_db
def test_ledger_prune_deletes_in_chunks_until_every_old_row_is_gone(
    make_user, make_room, settings, monkeypatch
):
    monkeypatch.setattr("infrastructure.postgres.DELETE_CHUNK", 2)
    alice = make_user("alice")
    general = make_room("general")
    events = [chat_event(room=general, author=alice, message_id=i) for i in range(1, 6)]
    _count_events_counted_days_ago(
        events, days=settings.ANALYTICS_LEDGER_RETENTION_DAYS + 1, settings=settings
    )

    assert services.processed_events_prune() == 5

    assert not ProcessedEvent.objects.exists()


@pytest.mark.django_db
def test_event_created_before_the_ledger_horizon_is_not_counted(make_user, make_room, settings):
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 30
    alice = make_user("alice")
    general = make_room("general")
    # Inside the retention, but within the horizon's margin of it: its row could be pruned soon.
    created_at = datetime.now(UTC) - timedelta(days=30) + timedelta(minutes=30)
    event = chat_event(room=general, author=alice, message_id=1, created_at=created_at)

    result = services.chat_events_record(events=[event])

    assert result == services.RecordResult(counted=0, duplicates=0, too_old=1)
    assert aggregates_snapshot() == ([], [], [], 0)


@pytest.mark.django_db
def test_event_created_just_after_the_ledger_horizon_is_counted(make_user, make_room, settings):
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 30
    alice = make_user("alice")
    general = make_room("general")
    created_at = services.ledger_horizon() + timedelta(minutes=5)
    event = chat_event(room=general, author=alice, message_id=1, created_at=created_at)

    assert services.chat_events_record(events=[event]) == services.RecordResult(counted=1, duplicates=0)


@pytest.mark.django_db
def test_batch_mixing_old_and_recent_events_counts_only_the_recent_ones(make_user, make_room, settings):
    alice = make_user("alice")
    general = make_room("general")
    too_old = datetime.now(UTC) - timedelta(days=settings.ANALYTICS_LEDGER_RETENTION_DAYS + 1)
    events = [
        chat_event(room=general, author=alice, message_id=1, created_at=too_old),
        chat_event(room=general, author=alice, message_id=2),
        chat_event(room=general, author=alice, message_id=3),
    ]

    result = services.chat_events_record(events=events)

    assert result == services.RecordResult(counted=2, duplicates=0, too_old=1)
    assert selectors.room_message_count(room_id=general.pk) == 2
    assert not ProcessedEvent.objects.filter(event_id=events[0]["event_id"]).exists()


@pytest.mark.django_db
def test_event_coming_back_after_its_ledger_row_was_pruned_is_not_counted_twice(
    make_user, make_room, settings
):
    """A dead letter replayed weeks later: the ledger no longer knows the event, the horizon does."""
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 30
    alice = make_user("alice")
    general = make_room("general")
    event = chat_event(
        room=general, author=alice, message_id=1, created_at=datetime.now(UTC) - timedelta(days=40)
    )
    _count_events_counted_days_ago([event], days=40, settings=settings)
    assert services.processed_events_prune() == 1

    again = services.chat_events_record(events=[event])

    assert again == services.RecordResult(counted=0, duplicates=0, too_old=1)
    assert selectors.room_message_count(room_id=general.pk) == 1


@pytest.mark.django_db
def test_raising_the_retention_keeps_refusing_events_whose_rows_were_pruned(make_user, make_room, settings):
    """Raised to replay an old dead letter: the rows a shorter retention deleted stay deleted."""
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 30
    alice = make_user("alice")
    general = make_room("general")
    event = chat_event(
        room=general, author=alice, message_id=1, created_at=datetime.now(UTC) - timedelta(days=40)
    )
    _count_events_counted_days_ago([event], days=40, settings=settings)
    services.processed_events_prune()

    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 60
    again = services.chat_events_record(events=[event])

    assert again == services.RecordResult(counted=0, duplicates=0, too_old=1)
    assert selectors.room_message_count(room_id=general.pk) == 1
    recent = chat_event(room=general, author=alice, message_id=2)
    assert services.chat_events_record(events=[recent]).counted == 1


@pytest.mark.django_db
def test_prune_mark_never_moves_back_when_the_retention_is_raised(settings):
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 30
    services.processed_events_prune()
    first = LedgerPrune.objects.get().pruned_before

    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 60
    services.processed_events_prune()

    assert LedgerPrune.objects.get().pruned_before == first
    settings.ANALYTICS_LEDGER_RETENTION_DAYS = 7
    services.processed_events_prune()
    assert LedgerPrune.objects.get().pruned_before > first


@pytest.mark.django_db(transaction=True)
def test_prune_waits_for_a_counting_transaction_that_read_the_previous_mark(make_user, make_room, settings):
    """Else a batch that passed the horizon could miss a row deleted before its insert."""
    alice = make_user("alice")
    general = make_room("general")
    services.processed_events_prune()  # the mark exists (the migration's row is flushed between tests)
    event = chat_event(room=general, author=alice, message_id=1)
    _count_events_counted_days_ago(
        [event], days=settings.ANALYTICS_LEDGER_RETENTION_DAYS + 1, settings=settings
    )
    counting, release = threading.Event(), threading.Event()

    def counting_transaction() -> None:
        with transaction.atomic():
            services.ledger_horizon(hold_prune=True)
            counting.set()
            release.wait(30)
        connection.close()

    def prune() -> None:
        services.processed_events_prune()
        connection.close()

    threads = [threading.Thread(target=counting_transaction), threading.Thread(target=prune)]
    threads[0].start()
    counting.wait(30)
    threads[1].start()
    try:
        wait_until(_a_session_waits_for_a_lock, timeout=30, message="the prune did not wait for the mark")
        assert ProcessedEvent.objects.filter(event_id=event["event_id"]).exists()
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
    assert not ProcessedEvent.objects.filter(event_id=event["event_id"]).exists()


def _a_session_waits_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def test_ledger_retention_under_a_day_is_refused_at_start_up():
    # Under the horizon's margin every event, fresh ones too, would be refused.
    env = {**child_process_env(), "ANALYTICS_LEDGER_RETENTION_DAYS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "ANALYTICS_LEDGER_RETENTION_DAYS must be at least 1" in done.stderr
