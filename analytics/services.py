"""Writes: counting chat events into the aggregates, effectively-once.

RabbitMQ delivers at least once: a message may come again after a worker died before its ack,
after a connection was cut, or when the relay published an event twice. Counting is made
idempotent instead: the ledger row of each event (analytics.ProcessedEvent) and the aggregate
updates commit in ONE transaction, and events already in the ledger are skipped. That is
exactly-once processing, not exactly-once delivery.

The ledger is pruned (processed_events_prune), and a pruned id no longer stops a duplicate. So
events created before the ledger horizon are never counted: whatever brings one back (a dead
letter replayed weeks later, a very long outage), it is refused rather than risk counting it twice.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from analytics.models import LedgerPrune, ProcessedEvent, RoomDayUserCount, RoomMinuteCount, UserMessageCount
from infrastructure.faults import fault_point
from infrastructure.postgres import delete_in_chunks
from messaging.events import MESSAGE_CREATED, MessageCreated

# The horizon sits this far inside the retention, so that a ledger row cannot be pruned between
# the horizon check and the insert that would find it, whatever the clock skew between the hosts
# stamping created_at (web), processed_at (PostgreSQL) and the prune's cutoff (the worker).
LEDGER_HORIZON_MARGIN = timedelta(hours=1)


class EventsPastLedgerHorizon(Exception):
    """Events too old to count at most once: their ledger rows may have been pruned (ledger_horizon)."""

    def __init__(self, *, too_old: int, batch: int, horizon: datetime) -> None:
        super().__init__(
            f"{too_old} of {batch} events were created before {horizon:%Y-%m-%d %H:%M:%S} UTC, past "
            f"the ledger's retention (ANALYTICS_LEDGER_RETENTION_DAYS="
            f"{settings.ANALYTICS_LEDGER_RETENTION_DAYS}): their ids may have been pruned, so "
            "counting them could count them twice; they were not counted (the others were, or "
            "already had been)"
        )


@dataclass(frozen=True)
class RecordResult:
    counted: int
    duplicates: int
    # Events created before the ledger horizon: neither counted nor recorded in the ledger.
    too_old: int = 0


def ledger_horizon(*, hold_prune: bool = False) -> datetime:
    """Events created before this time are not counted: their ledger rows may be pruned by now.

    A ledger row is pruned ANALYTICS_LEDGER_RETENTION_DAYS after its event was counted (and never
    before the last prune's cutoff, whatever the setting says now), and no event is counted
    before it was created; so the row of any event created after the horizon, if it was counted
    before, is still there to stop a second count. With `hold_prune` (in the counting
    transaction) the prune mark is read FOR SHARE: a prune moving it waits for this transaction
    to commit, so no row the batch could find is deleted under it, and a batch that waited for a
    prune reads the mark that prune committed.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pruned_before FROM {LedgerPrune._meta.db_table} WHERE id = 1"
            + (" FOR SHARE" if hold_prune else "")
        )
        row = cursor.fetchone()
    pruned_before = row[0] if row else None
    by_retention = timezone.now() - timedelta(days=settings.ANALYTICS_LEDGER_RETENTION_DAYS)
    return max(by_retention, pruned_before or by_retention) + LEDGER_HORIZON_MARGIN


def chat_events_record(*, events: object) -> RecordResult:
    """Count a batch of chat.message.created events, each exactly once, in one transaction.

    Called by the analytics task for every task message. Every event is validated before
    anything is written: one invalid event raises messaging.events.InvalidEvent and the batch
    changes nothing.
    Events already in the ledger (or repeated within the batch) are skipped; events created
    before the ledger horizon are left out and reported in `too_old` (the task dead-letters them).
    """
    parsed = MESSAGE_CREATED.parse_batch(events)
    with transaction.atomic():
        horizon = ledger_horizon(hold_prune=True)
        recent = [event for event in parsed if event.created_at >= horizon]
        too_old = len(parsed) - len(recent)
        unique = list({event.event_id: event for event in recent}.values())
        if not unique:
            return RecordResult(counted=0, duplicates=0, too_old=too_old)
        new_ids = _ledger_insert(unique)
        fresh = [event for event in unique if event.event_id in new_ids]
        if fresh:
            _room_minutes_add(fresh)
            _room_day_users_add(fresh)
            _user_counts_add(fresh)
        fault_point("analytics.in_transaction")
    fault_point("analytics.after_commit")
    return RecordResult(counted=len(fresh), duplicates=len(recent) - len(fresh), too_old=too_old)


def processed_events_prune() -> int:
    """Delete ledger rows of events counted longer ago than ANALYTICS_LEDGER_RETENTION_DAYS.

    Run hourly by Celery beat (analytics.tasks.prune_processed_events). Safe at any retention:
    chat_events_record refuses events created before ledger_horizon(), which is inside the same
    retention (hence no `older_than` argument here) and after every cutoff used so far (the
    LedgerPrune mark), so no event whose row is gone can be counted again. Returns how many rows
    were deleted.
    """
    cutoff = timezone.now() - timedelta(days=settings.ANALYTICS_LEDGER_RETENTION_DAYS)
    # The mark first, committed before any row goes. FOR UPDATE waits for the counting
    # transactions that read the old mark (FOR SHARE); later ones read the new mark and refuse
    # the events whose rows are about to go. Never moved back (a raised retention).
    with transaction.atomic():
        mark, created = LedgerPrune.objects.select_for_update().get_or_create(
            pk=1, defaults={"pruned_before": cutoff}
        )
        if not created and (mark.pruned_before is None or mark.pruned_before < cutoff):
            mark.pruned_before = cutoff
            mark.save(update_fields=["pruned_before"])
    return delete_in_chunks(ProcessedEvent.objects.filter(processed_at__lt=cutoff).order_by("processed_at"))


def _minute(event: MessageCreated) -> datetime:
    return event.created_at.astimezone(UTC).replace(second=0, microsecond=0)


def _day(event: MessageCreated) -> date:
    return event.created_at.astimezone(UTC).date()


def _values_sql(rows: int, columns: int) -> str:
    row = "(" + ", ".join(["%s"] * columns) + ")"
    return ", ".join([row] * rows)


def _execute_values(sql: str, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql.format(values=_values_sql(len(rows), len(rows[0]))), [v for r in rows for v in r])
        return cursor.fetchall() if cursor.description else []


def _ledger_insert(events: Iterable[MessageCreated]) -> set[uuid.UUID]:
    """Insert ledger rows; returns the ids that were not there yet (the ones to count).

    A concurrent worker inserting the same id waits for the other transaction: if that one
    commits, ON CONFLICT skips the id here; if it rolls back, this one counts it.
    """
    # Sorted keys make concurrent batches lock rows in the same order, so they cannot deadlock.
    rows = sorted((str(e.event_id), e.message_id, e.room_id, e.created_at) for e in events)
    returned = _execute_values(
        f"INSERT INTO {ProcessedEvent._meta.db_table} "
        "(event_id, message_id, room_id, created_at, processed_at) "
        "SELECT v.event_id::uuid, v.message_id, v.room_id, v.created_at::timestamptz, clock_timestamp() "
        "FROM (VALUES {values}) AS v(event_id, message_id, room_id, created_at) "
        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        rows,
    )
    return {value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)) for (value,) in returned}


def _room_minutes_add(events: Sequence[MessageCreated]) -> None:
    counts = Counter((e.room_id, _minute(e)) for e in events)
    _execute_values(
        f"INSERT INTO {RoomMinuteCount._meta.db_table} AS t (room_id, minute, count) VALUES {{values}} "
        "ON CONFLICT (room_id, minute) DO UPDATE SET count = t.count + EXCLUDED.count",
        [(room_id, minute, n) for (room_id, minute), n in sorted(counts.items())],
    )


def _room_day_users_add(events: Sequence[MessageCreated]) -> None:
    counts = Counter((e.room_id, _day(e), e.author_id) for e in events)
    _execute_values(
        f"INSERT INTO {RoomDayUserCount._meta.db_table} AS t (room_id, day, user_id, count) "
        "VALUES {values} ON CONFLICT (room_id, day, user_id) DO UPDATE SET count = t.count + EXCLUDED.count",
        [(room_id, day, user_id, n) for (room_id, day, user_id), n in sorted(counts.items())],
    )


def _user_counts_add(events: Sequence[MessageCreated]) -> None:
    counts: Counter[int] = Counter(e.author_id for e in events)
    last: dict[int, datetime] = {}
    for e in events:
        last[e.author_id] = max(last.get(e.author_id, e.created_at), e.created_at)
    _execute_values(
        f"INSERT INTO {UserMessageCount._meta.db_table} AS t (user_id, count, last_message_at) "
        "VALUES {values} ON CONFLICT (user_id) DO UPDATE SET count = t.count + EXCLUDED.count, "
        "last_message_at = GREATEST(t.last_message_at, EXCLUDED.last_message_at)",
        [(user_id, n, last[user_id]) for user_id, n in sorted(counts.items())],
    )
