"""Writes: archiving dead letters, recording task failures, replaying and discarding.

Design of "the reason travels with the message": RabbitMQ dead-letters the original message and
only adds `x-death`; it cannot add the worker's error. Republishing a modified copy to the DLX
from the worker would need confirms and would lose RabbitMQ's own `x-death` bookkeeping. So the
worker commits a TaskFailure row keyed by the Celery task id before the message is rejected
(worker_hooks.py), and the archiver joins it here by task id. Both sides take the same
transaction-scoped advisory lock on the task id, and whichever comes second completes the join,
so the order does not matter (Celery's consumer-level rejects, unknown tasks, signal after the
reject). Expired and overflowed messages never reach a worker: they carry only `x-death`, and the
archive describes them from it.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import math
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

import amqp
from django.conf import settings
from django.contrib.admin.models import CHANGE, LogEntry
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from chatproject.broker import DEAD_LETTER_EXCHANGE
from chatproject.broker_connection import BrokerUnavailable
from chatproject.confirms import ConfirmingPublisher, Outgoing
from chatproject.database import delete_in_chunks
from chatproject.deadletters.models import DeadLetter, DeadLetterAction, TaskFailure

logger = logging.getLogger(__name__)

# Headers RabbitMQ writes when it dead-letters; a replay drops them so the next death is described
# afresh instead of being folded into the old history.
DEATH_HEADERS = ("x-death", "x-first-death-queue", "x-first-death-reason", "x-first-death-exchange")
DEATH_HEADER_PREFIXES = ("x-last-death-",)
# Properties a replay must not copy: RabbitMQ checks user_id against the publishing user, and an
# expiration would let the replay expire again (RabbitMQ already strips it when dead-lettering).
REPLAY_DROPPED_PROPERTIES = ("user_id", "expiration", "timestamp", "application_headers")
REPLAY_HEADER = "x-replay-of"
# A failure note a worker sent through the broker because it could not reach the database.
FAILURE_NOTE_HEADER = "x-task-failure-note"
FAILURE_NOTE_ROUTING_KEY = "deadletters.task_failure"
# Letters per publish-and-confirm round and per marking transaction.
REPLAY_CHUNK = 200


# --- archiving --------------------------------------------------------------------------------


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
# Room kept for the storage error in a minimal row; a driver message can quote a huge value.
MINIMAL_ROW_ERROR_CHARS = 4000


def json_safe(value: Any) -> Any:
    """AMQP header and property values as JSON: times as ISO strings, bytes as text or base64."""
    if isinstance(value, Mapping):
        return {_json_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = _storable_text(bytes(value))
        return text if text is not None else base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, str):
        return _json_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # jsonb has no NaN or Infinity
    return value


def _json_text(text: str) -> str:
    """`text` as jsonb and text columns take it: no NUL, no lone surrogate (py-amqp decodes header
    strings with surrogatepass). The letter is still shown, with U+FFFD or ? in their place."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _storable_text(raw: bytes) -> str | None:
    """`raw` as text when PostgreSQL can store it as such: UTF-8 without NUL (text columns refuse it)."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _as_bytes(body: bytes | str | None, encoding: str | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode(encoding or "utf-8")
    return bytes(body)


def _death_time(entry: Mapping[str, Any]) -> datetime | None:
    value = entry.get("time")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=UTC)
    return None


def _expiry_or_overflow_message(reason: str, queue: str, entry: Mapping[str, Any]) -> str:
    if reason == "expired":
        ttl = entry.get("original-expiration")
        ttl_text = f"message TTL of {json_safe(ttl)} ms" if ttl is not None else "queue message TTL"
        return f"{ttl_text} ran out in queue {queue!r} before any consumer took it"
    if reason == "maxlen":
        return f"queue {queue!r} was over its length limit (x-max-length / x-max-length-bytes)"
    if reason == "delivery_limit":
        return f"queue {queue!r} delivered it more times than its delivery limit"
    return ""


def _undecodable_error(raw: bytes, properties: Mapping[str, Any]) -> tuple[str, str]:
    """(error class, message) when a JSON body cannot be decoded: the worker rejects those
    before any task runs (chatproject/worker_consumer.py), so no failure record comes for them."""
    if properties.get("content_type") != "application/json":
        return "", ""
    try:
        json.loads(raw.decode(properties.get("content_encoding") or "utf-8"))
    except (UnicodeDecodeError, LookupError, ValueError) as error:
        return "kombu.exceptions.DecodeError", f"the body cannot be decoded as JSON: {error}"
    return "", ""


@dataclass(frozen=True)
class _StoredMessage:
    """A delivery's message as the archive stores it, and the fingerprint of that form."""

    raw: bytes
    body: str
    body_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    fingerprint: str


def _stored_message(delivery: Mapping[str, Any]) -> _StoredMessage:
    properties = {k: v for k, v in (delivery.get("properties") or {}).items() if k != "application_headers"}
    raw = _as_bytes(delivery.get("body"), properties.get("content_encoding"))
    body_text = _storable_text(raw)
    if body_text is not None:
        body_encoding = DeadLetter.BodyEncoding.UTF8
    else:
        body_text, body_encoding = base64.b64encode(raw).decode("ascii"), DeadLetter.BodyEncoding.BASE64
    safe_headers = json_safe(dict(delivery.get("headers") or {}))
    safe_properties = json_safe(properties)
    # RabbitMQ redelivers a message unchanged, so every delivery of one dead letter has the same.
    fingerprint = hashlib.sha256(
        json.dumps([safe_properties, safe_headers, body_text], sort_keys=True, default=str).encode()
    ).hexdigest()
    return _StoredMessage(raw, body_text, body_encoding, safe_headers, safe_properties, fingerprint)


def _dead_letter_from_delivery(delivery: Mapping[str, Any]) -> DeadLetter:
    """The (unsaved) row for one delivery from `dead_letters`; the origin comes from x-death."""
    stored = _stored_message(delivery)
    headers = dict(delivery.get("headers") or {})
    properties = delivery.get("properties") or {}
    x_death = [entry for entry in headers.get("x-death") or [] if isinstance(entry, Mapping)]
    # x-death lists the most recent death first, one entry per (queue, reason).
    latest = x_death[0] if x_death else {}
    routing_keys = latest.get("routing-keys") or [delivery.get("routing_key", "")]
    times = [t for t in (_death_time(entry) for entry in x_death) if t is not None]
    reason = str(latest.get("reason") or headers.get("x-first-death-reason") or "unknown")
    origin_queue = str(latest.get("queue") or headers.get("x-first-death-queue") or "")
    retries = headers.get("retries")
    error_class, error_message = _undecodable_error(stored.raw, properties)
    return DeadLetter(
        fingerprint=stored.fingerprint,
        origin_queue=origin_queue,
        origin_exchange=str(latest.get("exchange", delivery.get("exchange", "")) or ""),
        routing_key=str(json_safe(routing_keys[0]) if routing_keys else ""),
        reason=reason,
        task_name=str(headers.get("task") or ""),
        task_id=str(headers.get("id") or properties.get("correlation_id") or ""),
        message_id=str(properties.get("message_id") or ""),
        error_class=error_class,
        error_message=error_message or _expiry_or_overflow_message(reason, origin_queue, latest),
        attempts=int(retries) + 1 if isinstance(retries, int) else None,
        death_count=sum(int(entry.get("count") or 1) for entry in x_death) or 1,
        first_death_at=min(times) if times else None,
        last_death_at=max(times) if times else timezone.now(),
        x_death=json_safe(x_death),
        headers=stored.headers,
        properties=stored.properties,
        body=stored.body,
        body_encoding=stored.body_encoding,
        ack_pending=True,
    )


def _minimal_dead_letter(delivery: Mapping[str, Any], *, error: BaseException) -> DeadLetter:
    """The row for a delivery whose full row could not be stored: the raw body as base64 (replayable
    byte for byte), the headers and properties as json_safe makes them, and the storage error.
    Every value taken from the message is cleaned and cut to its column, so that what made the
    full row fail cannot make this one fail too."""
    stored = _stored_message(delivery)
    x_death = stored.headers.get("x-death")
    x_death = [entry for entry in x_death if isinstance(entry, dict)] if isinstance(x_death, list) else []
    latest = x_death[0] if x_death else {}
    routing_keys = latest.get("routing-keys")
    routing_key = routing_keys[0] if isinstance(routing_keys, list) and routing_keys else None
    trace = "".join(traceback.format_exception(error))
    return DeadLetter(
        fingerprint=stored.fingerprint,
        origin_queue=_column_text("origin_queue", latest.get("queue")),
        origin_exchange=_column_text("origin_exchange", latest.get("exchange", delivery.get("exchange"))),
        routing_key=_column_text("routing_key", routing_key or delivery.get("routing_key")),
        reason=_column_text("reason", latest.get("reason") or "unknown"),
        task_name=_column_text("task_name", stored.headers.get("task")),
        task_id=_column_text("task_id", stored.headers.get("id") or stored.properties.get("correlation_id")),
        message_id=_column_text("message_id", stored.properties.get("message_id")),
        error_class=_column_text("error_class", _error_class_path(error)),
        error_message=_json_text(
            "Archived in minimal form (body as base64, without the worker's error): the full row "
            f"was refused with {_error_class_path(error)}: {error}"
        )[:MINIMAL_ROW_ERROR_CHARS],
        traceback=_json_text(trace)[-MINIMAL_ROW_ERROR_CHARS:],
        last_death_at=timezone.now(),
        x_death=x_death,
        headers=stored.headers,
        properties=stored.properties,
        body=base64.b64encode(stored.raw).decode("ascii"),
        body_encoding=DeadLetter.BodyEncoding.BASE64,
        ack_pending=True,
    )


def _column_text(field_name: str, value: Any) -> str:
    text = "" if value is None else _json_text(str(value))
    return text[: DeadLetter._meta.get_field(field_name).max_length]


def _error_class_path(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"


def _error_label(error: BaseException) -> str:
    """What a log line may say about a storage error: its class and SQLSTATE, never its text,
    which can quote the message's content."""
    sqlstate = getattr(error.__cause__, "pgcode", None)  # psycopg2's name for it
    return f"{_error_class_path(error)}, SQLSTATE {sqlstate}" if sqlstate else _error_class_path(error)


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
    minimal row (_minimal_dead_letter); one that cannot even have that comes back UNSTORABLE.
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
            _error_label(error),
        )
    return [result for delivery in deliveries for result in dead_letters_archive(deliveries=[delivery])]


def _archive_together(deliveries: Sequence[Mapping[str, Any]]) -> list[ArchiveResult]:
    notes = {i: _failure_note(d) for i, d in enumerate(deliveries) if _is_failure_note(d)}
    letters = {i: _dead_letter_from_delivery(d) for i, d in enumerate(deliveries) if i not in notes}
    redelivered = {i for i in letters if deliveries[i].get("redelivered")}
    results: dict[int, ArchiveResult] = {}
    with transaction.atomic():
        _lock_tasks(({dl.task_id for dl in letters.values()} | {n["task_id"] for n in notes.values()}) - {""})
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
        _join_failures([letter for letter in fresh if letter.reason == "rejected" and letter.task_id])
        DeadLetter.objects.bulk_create(fresh)
    return [results[i] for i in range(len(deliveries))]


def _archive_minimal(delivery: Mapping[str, Any], *, error: Exception) -> ArchiveResult:
    """Store the minimal row of a delivery whose full row failed with `error`, in its own transaction."""
    try:
        with transaction.atomic():
            letter = _minimal_dead_letter(delivery, error=error)
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
            _error_label(error),
            _error_label(second_error),
        )
        return ArchiveResult(ArchiveOutcome.UNSTORABLE, None)
    logger.warning(
        "dead letter #%d archived in minimal form: its full row was refused (%s)",
        letter.pk,
        _error_label(error),
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


def _is_failure_note(delivery: Mapping[str, Any]) -> bool:
    return bool((delivery.get("headers") or {}).get(FAILURE_NOTE_HEADER))


def _failure_note(delivery: Mapping[str, Any]) -> dict[str, Any]:
    note = json.loads(_as_bytes(delivery.get("body"), "utf-8").decode("utf-8"))
    attempts = note.get("attempts")
    return {
        "task_id": str(note.get("task_id") or ""),
        "task_name": str(note.get("task_name") or ""),
        "error_class": str(note.get("error_class") or ""),
        "error_message": str(note.get("error_message") or ""),
        "traceback": str(note.get("traceback") or ""),
        "attempts": attempts if isinstance(attempts, int) else None,
    }


def _lock_tasks(task_ids: set[str]) -> None:
    # Serialises the archiver's and the worker's halves of the failure join for each task id;
    # taken in sorted order so that two archivers locking the same ids cannot deadlock.
    if not task_ids:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('deadletters:' || id, 0)) "
            "FROM (SELECT id FROM unnest(%s::text[]) AS t(id) ORDER BY id) AS sorted",
            [sorted(task_ids)],
        )


def _lock_task(task_id: str) -> None:
    _lock_tasks({task_id})


def _join_failures(letters: list[DeadLetter]) -> None:
    """Copy the TaskFailure rows the workers left for these letters into them, and drop those rows."""
    if not letters:
        return
    failures = {f.task_id: f for f in TaskFailure.objects.filter(task_id__in=[dl.task_id for dl in letters])}
    for letter in letters:
        failure = failures.get(letter.task_id)
        if failure is not None:
            _copy_failure(failure, letter)
    if failures:
        TaskFailure.objects.filter(task_id__in=list(failures)).delete()


def _copy_failure(failure: TaskFailure, dead_letter: DeadLetter) -> None:
    dead_letter.task_name = dead_letter.task_name or failure.task_name
    dead_letter.error_class = failure.error_class
    dead_letter.error_message = failure.error_message
    dead_letter.traceback = failure.traceback
    if failure.attempts is not None:
        dead_letter.attempts = failure.attempts


def task_failure_record(
    *,
    task_id: str,
    task_name: str,
    error_class: str,
    error_message: str,
    traceback: str,
    attempts: int | None,
) -> None:
    """Record why task `task_id` failed for good; called by worker_hooks in the worker.

    Completes an already-archived dead letter of that task that still lacks its error, or leaves
    a TaskFailure row for the archiver to join.
    """
    with transaction.atomic():
        _lock_task(task_id)
        waiting = (
            DeadLetter.objects.filter(task_id=task_id, reason="rejected", error_class="", error_message="")
            .order_by("-id")
            .first()
        )
        failure = TaskFailure(
            task_id=task_id,
            task_name=task_name,
            error_class=error_class,
            error_message=error_message,
            traceback=traceback,
            attempts=attempts,
        )
        if waiting is not None:
            _copy_failure(failure, waiting)
            waiting.updated_at = timezone.now()
            waiting.save()
            return
        TaskFailure.objects.update_or_create(
            task_id=task_id,
            defaults={
                "task_name": task_name,
                "error_class": error_class,
                "error_message": error_message,
                "traceback": traceback,
                "attempts": attempts,
                "failed_at": timezone.now(),
            },
        )


def task_failure_publish(
    *,
    task_id: str,
    task_name: str,
    error_class: str,
    error_message: str,
    traceback: str,
    attempts: int | None,
) -> None:
    """Send a failure note to the archiver over the broker (confirmed); worker_hooks' fallback
    when the database is unreachable.

    The note goes to the dead-letter exchange, so it reaches `dead_letters` before the dead letter
    the worker is about to reject; the archiver records it as a TaskFailure and joins it.
    """
    from chatproject.celery import app

    note = {
        "task_id": task_id,
        "task_name": task_name,
        "error_class": error_class,
        "error_message": error_message,
        "traceback": traceback,
        "attempts": attempts,
    }
    # CELERY_BROKER_TRANSPORT_OPTIONS has confirm_publish: publish returns once RabbitMQ has it.
    with app.producer_or_acquire() as producer:
        producer.publish(
            note,
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key=FAILURE_NOTE_ROUTING_KEY,
            serializer="json",
            delivery_mode=2,
            headers={FAILURE_NOTE_HEADER: 1},
            declare=[DEAD_LETTER_EXCHANGE],
            retry=True,
            retry_policy={"max_retries": 3},
        )


def task_failures_prune(*, older_than: timedelta | None = None) -> int:
    """Delete failure rows no dead letter claimed (the reject never happened); returns how many."""
    older_than = older_than or timedelta(days=settings.DLQ_TASK_FAILURE_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    return delete_in_chunks(TaskFailure.objects.filter(failed_at__lt=cutoff).order_by("failed_at"))


def dead_letters_prune(*, older_than: timedelta | None = None) -> int:
    """Delete resolved dead letters (replayed or discarded) not acted on within the retention.

    Run hourly by the archiver. Age counts from the last replay or discard (`updated_at`), so a
    letter resolved today is kept its full retention however long ago it died. A `new` letter is
    never deleted, however old: it is work nobody has looked at yet. The audit rows go with their
    letter; returns how many letters were deleted.
    """
    if older_than is None:
        older_than = timedelta(days=settings.DLQ_RESOLVED_RETENTION_DAYS)
    resolved = DeadLetter.objects.filter(status__in=DeadLetter.RESOLVED_STATUSES)
    return delete_in_chunks(resolved.filter(updated_at__lt=timezone.now() - older_than).order_by("pk"))


# --- replay and discard -----------------------------------------------------------------------


def replay_publisher(broker_url: str | None = None) -> ConfirmingPublisher:
    """The confirming publisher replays go through; a returned message is found by REPLAY_HEADER."""
    return ConfirmingPublisher(
        broker_url or settings.CELERY_BROKER_URL,
        return_key=lambda message: (message.properties.get("application_headers") or {}).get(REPLAY_HEADER),
    )


def replay_message(dead_letter: DeadLetter) -> tuple[bytes, dict[str, Any]]:
    """The body and properties a replay publishes: the original minus the death history."""
    body = (
        base64.b64decode(dead_letter.body)
        if dead_letter.body_encoding == DeadLetter.BodyEncoding.BASE64
        else dead_letter.body.encode("utf-8")
    )
    headers = {
        key: value
        for key, value in (dead_letter.headers or {}).items()
        if key not in DEATH_HEADERS and not key.startswith(DEATH_HEADER_PREFIXES)
    }
    if "retries" in headers:
        # A replay is a fresh start: with the old count the first transient error would exhaust
        # the task's retries at once.
        headers["retries"] = 0
    headers[REPLAY_HEADER] = dead_letter.pk
    properties = {
        key: value
        for key, value in (dead_letter.properties or {}).items()
        if key not in REPLAY_DROPPED_PROPERTIES and value is not None
    }
    properties.setdefault("delivery_mode", 2)
    properties["application_headers"] = headers
    return body, properties


@dataclass
class BulkResult:
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def _actor_label(actor: Any, actor_label: str | None) -> str:
    if actor_label:
        return actor_label
    if actor is not None and getattr(actor, "is_authenticated", False):
        return actor.get_username()
    return f"cli:{getpass.getuser()}"


def _audit(*, dead_letters: list[DeadLetter], kind: str, actor: Any, label: str) -> None:
    user = actor if actor is not None and getattr(actor, "pk", None) else None
    DeadLetterAction.objects.bulk_create(
        DeadLetterAction(dead_letter=dead_letter, kind=kind, actor=user, actor_label=label)
        for dead_letter in dead_letters
    )
    if user is not None:
        LogEntry.objects.log_actions(
            user_id=user.pk,
            queryset=dead_letters,
            action_flag=CHANGE,
            change_message="Replayed to its original exchange" if kind == "replayed" else "Discarded",
        )


def dead_letter_replay(
    *,
    dead_letters: Iterable[DeadLetter],
    actor: Any = None,
    actor_label: str | None = None,
    publisher: ConfirmingPublisher | None = None,
) -> BulkResult:
    """Republish each dead letter to its original exchange and routing key, confirmed, and mark it.

    Works in chunks: publish a chunk, wait for its confirms, then mark the confirmed rows (status
    replayed, replay_count + 1, audit row and admin LogEntry) in one transaction. A crash between
    the confirms and the commit leaves those rows as they were, and replaying them again is
    harmless: the consumers are idempotent, which is also what makes replaying a letter whose
    effect already happened change nothing.
    """
    label = _actor_label(actor, actor_label)
    result = BulkResult()
    own_publisher = publisher is None
    publisher = publisher or replay_publisher()
    chunk: list[DeadLetter] = []
    try:
        for dead_letter in dead_letters:
            chunk.append(dead_letter)
            if len(chunk) == REPLAY_CHUNK:
                _replay_chunk(chunk, publisher=publisher, actor=actor, label=label, result=result)
                chunk = []
        if chunk:
            _replay_chunk(chunk, publisher=publisher, actor=actor, label=label, result=result)
    finally:
        if own_publisher:
            publisher.close()
    if result.done or result.failed:
        logger.info("%s replayed %d dead letters (%d failed)", label, len(result.done), len(result.failed))
    return result


def _replay_chunk(
    chunk: list[DeadLetter], *, publisher: ConfirmingPublisher, actor: Any, label: str, result: BulkResult
) -> None:
    batch = []
    for dead_letter in chunk:
        body, properties = replay_message(dead_letter)
        batch.append(
            Outgoing(
                dead_letter.pk,
                amqp.Message(body, **properties),
                dead_letter.origin_exchange,
                dead_letter.routing_key,
            )
        )
    try:
        failed = publisher.publish(batch)
    except BrokerUnavailable as error:
        # Nothing of the chunk counts as replayed; replaying it again is harmless.
        result.failed.update({dead_letter.pk: f"broker unreachable: {error}" for dead_letter in chunk})
        return
    confirmed = [dead_letter for dead_letter in chunk if dead_letter.pk not in failed]
    if confirmed:
        now = timezone.now()
        with transaction.atomic():
            DeadLetter.objects.filter(pk__in=[dl.pk for dl in confirmed]).update(
                status=DeadLetter.Status.REPLAYED,
                replay_count=F("replay_count") + 1,
                last_replayed_at=now,
                updated_at=now,
            )
            _audit(dead_letters=confirmed, kind=DeadLetterAction.Kind.REPLAYED, actor=actor, label=label)
    # Side effects, in order: the chunk's publishes confirmed by RabbitMQ, then its rows marked.
    result.done.extend(dead_letter.pk for dead_letter in confirmed)
    result.failed.update(failed)


def dead_letter_discard(
    *, dead_letters: Iterable[DeadLetter], actor: Any = None, actor_label: str | None = None
) -> BulkResult:
    """Mark dead letters discarded: kept for the record and still replayable, but no longer `new`."""
    label = _actor_label(actor, actor_label)
    letters = list(dead_letters)
    with transaction.atomic():
        DeadLetter.objects.filter(pk__in=[dl.pk for dl in letters]).update(
            status=DeadLetter.Status.DISCARDED, updated_at=timezone.now()
        )
        _audit(dead_letters=letters, kind=DeadLetterAction.Kind.DISCARDED, actor=actor, label=label)
    if letters:
        logger.info("%s discarded %d dead letters", label, len(letters))
    return BulkResult(done=[dl.pk for dl in letters])
