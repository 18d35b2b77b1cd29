import uuid
from datetime import UTC, datetime

import pytest

from analytics import selectors, services
from analytics.models import ProcessedEvent, RoomDayUserCount, RoomMinuteCount, UserMessageCount


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
    minute = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)
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

    with pytest.raises(services.InvalidEvent):
        services.chat_events_record(events=[valid, broken])

    assert aggregates_snapshot() == ([], [], [], 0)


@pytest.mark.parametrize("payload", [None, "events", {"event_id": "x"}, [1, 2]])
@pytest.mark.django_db
def test_payload_that_is_not_a_list_of_events_raises_invalid_event(payload):
    with pytest.raises(services.InvalidEvent):
        services.chat_events_record(events=payload)


@pytest.mark.django_db
def test_ledger_keeps_created_and_processed_times_for_lag(make_user, make_room):
    alice = make_user("alice")
    general = make_room("general")
    created_at = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    event = chat_event(room=general, author=alice, message_id=1, created_at=created_at)

    services.chat_events_record(events=[event])

    row = ProcessedEvent.objects.get(event_id=event["event_id"])
    assert row.created_at == created_at
    assert row.processed_at >= created_at
