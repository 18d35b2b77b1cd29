"""Archiving what arrives on `dead_letters`, each dead letter once; called by the archiver.

The rows come from delivery_rows; a failure note or a worker's TaskFailure row is joined to its
letter by task_failures.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.db import InterfaceError, OperationalError, transaction

from deadletters.models import DeadLetter
from deadletters.services.delivery_rows import (
    dead_letter_from_delivery,
    minimal_dead_letter,
    storage_error_label,
)
from deadletters.services.task_failures import (
    failure_note_fields,
    is_failure_note,
    lock_task_ids,
    task_failure_record,
    task_failures_join,
)

logger = logging.getLogger(__name__)


class ArchiveOutcome(StrEnum):
    ARCHIVED = "archived"
    # A redelivery of a delivery whose row was committed, but whose ack RabbitMQ never handled.
    ALREADY_ARCHIVED = "already archived"
    # The database refused the full row: the raw message and that error were stored instead.
    ARCHIVED_MINIMAL = "archived minimal"
    # A failure note (see task_failure_publish), recorded as a TaskFailure.
    FAILURE_RECORDED = "failure recorded"
    # Nothing could be stored, not even the minimal row: the caller must not ack it.
    UNSTORABLE = "unstorable"


@dataclass(frozen=True)
class ArchiveResult:
    """What became of one delivery; `dead_letter` is None for failure notes and unstorable ones."""

    outcome: ArchiveOutcome
    dead_letter: DeadLetter | None

    @property
    def created(self) -> bool:
        return self.outcome in (ArchiveOutcome.ARCHIVED, ArchiveOutcome.ARCHIVED_MINIMAL)

    @property
    def stored(self) -> bool:
        """Safe to ack: the delivery is in the database, as a row or as a failure record."""
        return self.outcome is not ArchiveOutcome.UNSTORABLE


# The database connection is gone, or the server aborted the transaction (deadlock, shutdown,
# timeout): the batch is retried whole after a reconnect. Any other error is taken to come from the
# content of a message, and the batch falls back to one transaction per letter.
CONNECTION_ERRORS = (OperationalError, InterfaceError)


def dead_letter_archive(
    *,
    body: bytes | str | None,
    headers: Mapping[str, Any] | None,
    properties: Mapping[str, Any] | None,
    exchange: str = "",
    routing_key: str = "",
    redelivered: bool = False,
) -> ArchiveResult:
    """Store one message received from `dead_letters` (see dead_letters_archive)."""
    delivery = {"body": body, "headers": headers, "properties": properties, "exchange": exchange}
    return dead_letters_archive(
        deliveries=[{**delivery, "routing_key": routing_key, "redelivered": redelivered}]
    )[0]


def dead_letters_archive(*, deliveries: Sequence[Mapping[str, Any]]) -> list[ArchiveResult]:
    """Archive a batch of deliveries (dead_letter_archive's keyword arguments); one result each.

    Called by the archiver, which acks what this stored only after it returned. Once only: a
    delivery RabbitMQ flags `redelivered` may have been archived by an archiver that died before
    its ack was handled, so it takes over a row of its fingerprint still `ack_pending`; a first
    delivery never was (RabbitMQ guarantees an unflagged delivery was never delivered before), so
    it always gets a row of its own, and two deaths of identical content stay two rows.

    One transaction and a handful of queries for the whole batch. When that fails for any reason
    but a lost connection (CONNECTION_ERRORS propagate: the caller retries the batch), each
    delivery is archived in a transaction of its own, and one the database refuses in full gets a
    minimal row (minimal_dead_letter); one that cannot even have that comes back UNSTORABLE.
    Failure notes (see task_failure_publish) are recorded as TaskFailure rows, not archived.
    """
    try:
        return _archive_together(deliveries)
    except CONNECTION_ERRORS:
        raise
    except Exception as error:
        if len(deliveries) == 1:
            return [_archive_minimal(deliveries[0], error=error)]
        logger.warning(
            "archiving %d dead letters together failed (%s); archiving them one at a time",
            len(deliveries),
            storage_error_label(error),
        )
    return [result for delivery in deliveries for result in dead_letters_archive(deliveries=[delivery])]


def _archive_together(deliveries: Sequence[Mapping[str, Any]]) -> list[ArchiveResult]:
    notes = {i: failure_note_fields(d) for i, d in enumerate(deliveries) if is_failure_note(d)}
    letters = {i: dead_letter_from_delivery(d) for i, d in enumerate(deliveries) if i not in notes}
    redelivered = {i for i in letters if deliveries[i].get("redelivered")}
    results: dict[int, ArchiveResult] = {}
    with transaction.atomic():
        lock_task_ids(
            ({dl.task_id for dl in letters.values()} | {n["task_id"] for n in notes.values()}) - {""}
        )
        # Notes first: a worker sends its note before rejecting, so it precedes its letter.
        for i, note in notes.items():
            task_failure_record(**note)
            results[i] = ArchiveResult(ArchiveOutcome.FAILURE_RECORDED, None)
        pending = _pending_rows(Counter(letters[i].fingerprint for i in redelivered))
        fresh: list[DeadLetter] = []
        for i, letter in letters.items():
            left_behind = pending.get(letter.fingerprint) if i in redelivered else None
            if left_behind:
                results[i] = ArchiveResult(ArchiveOutcome.ALREADY_ARCHIVED, left_behind.pop())
            else:
                fresh.append(letter)
                results[i] = ArchiveResult(ArchiveOutcome.ARCHIVED, letter)
        task_failures_join([letter for letter in fresh if letter.reason == "rejected" and letter.task_id])
        DeadLetter.objects.bulk_create(fresh)
    return [results[i] for i in range(len(deliveries))]


def _archive_minimal(delivery: Mapping[str, Any], *, error: Exception) -> ArchiveResult:
    """Store the minimal row of a delivery whose full row failed with `error`, in its own transaction."""
    try:
        with transaction.atomic():
            letter = minimal_dead_letter(delivery, error=error)
            if delivery.get("redelivered"):
                left_behind = _pending_rows(Counter([letter.fingerprint])).get(letter.fingerprint)
                if left_behind:
                    return ArchiveResult(ArchiveOutcome.ALREADY_ARCHIVED, left_behind[0])
            letter.save()
    except CONNECTION_ERRORS:
        raise
    except Exception as second_error:
        logger.error(
            "a dead letter could not be stored, not even in minimal form (%s, then %s)",
            storage_error_label(error),
            storage_error_label(second_error),
        )
        return ArchiveResult(ArchiveOutcome.UNSTORABLE, None)
    logger.warning(
        "dead letter #%d archived in minimal form: its full row was refused (%s)",
        letter.pk,
        storage_error_label(error),
    )
    return ArchiveResult(ArchiveOutcome.ARCHIVED_MINIMAL, letter)


def _pending_rows(wanted: Counter[str]) -> dict[str, list[DeadLetter]]:
    """Up to `wanted[f]` rows of fingerprint f still waiting for their ack, locked for this
    transaction. SKIP LOCKED: a row another archiver is taking over (or marking acked) belongs to
    another delivery, so this one looks for a further row or gets a new one."""
    if not wanted:
        return {}
    table = DeadLetter._meta.db_table
    rows = DeadLetter.objects.raw(
        "SELECT d.* FROM unnest(%s::text[], %s::int[]) AS wanted(fingerprint, n) "
        f"CROSS JOIN LATERAL (SELECT * FROM {table} WHERE fingerprint = wanted.fingerprint "
        "AND ack_pending ORDER BY id LIMIT wanted.n FOR UPDATE SKIP LOCKED) AS d",
        [list(wanted), list(wanted.values())],
    )
    found: dict[str, list[DeadLetter]] = {}
    for row in rows:
        found.setdefault(row.fingerprint, []).append(row)
    return found


def dead_letters_mark_acked(*, dead_letters: Iterable[DeadLetter]) -> None:
    """Called by the archiver once RabbitMQ has handled the acks of these letters' deliveries:
    they cannot be redelivered any more, so no redelivery may take their rows over."""
    ids = [dead_letter.pk for dead_letter in dead_letters]
    if ids:
        DeadLetter.objects.filter(pk__in=ids, ack_pending=True).update(ack_pending=False)
