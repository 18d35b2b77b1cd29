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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import amqp
from django.conf import settings
from django.contrib.admin.models import CHANGE, LogEntry
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from chatproject.broker import DEAD_LETTER_EXCHANGE
from chatproject.confirms import BrokerUnavailable, ConfirmingPublisher, Outgoing
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


@dataclass(frozen=True)
class ArchiveResult:
    dead_letter: DeadLetter
    created: bool


def json_safe(value: Any) -> Any:
    """AMQP header and property values as JSON: times as ISO strings, bytes as text or base64."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = _storable_text(bytes(value))
        return text if text is not None else base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")  # jsonb cannot hold NUL; the letter is still shown
    return value


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


def _dead_letter_from_delivery(
    *,
    body: bytes | str | None,
    headers: Mapping[str, Any] | None,
    properties: Mapping[str, Any] | None,
    exchange: str = "",
    routing_key: str = "",
) -> DeadLetter:
    """The (unsaved) row for one delivery from `dead_letters`; the origin comes from x-death."""
    headers = dict(headers or {})
    properties = {k: v for k, v in (properties or {}).items() if k != "application_headers"}
    raw = _as_bytes(body, properties.get("content_encoding"))
    body_text = _storable_text(raw)
    if body_text is not None:
        body_encoding = DeadLetter.BodyEncoding.UTF8
    else:
        body_text, body_encoding = base64.b64encode(raw).decode("ascii"), DeadLetter.BodyEncoding.BASE64
    safe_headers = json_safe(headers)
    safe_properties = json_safe(properties)
    fingerprint = hashlib.sha256(
        json.dumps([safe_properties, safe_headers, body_text], sort_keys=True, default=str).encode()
    ).hexdigest()

    x_death = [entry for entry in headers.get("x-death") or [] if isinstance(entry, Mapping)]
    # x-death lists the most recent death first, one entry per (queue, reason).
    latest = x_death[0] if x_death else {}
    routing_keys = latest.get("routing-keys") or [routing_key]
    times = [t for t in (_death_time(entry) for entry in x_death) if t is not None]
    reason = str(latest.get("reason") or headers.get("x-first-death-reason") or "unknown")
    origin_queue = str(latest.get("queue") or headers.get("x-first-death-queue") or "")
    retries = headers.get("retries")
    error_class, error_message = _undecodable_error(raw, properties)
    return DeadLetter(
        fingerprint=fingerprint,
        origin_queue=origin_queue,
        origin_exchange=str(latest.get("exchange", exchange) or ""),
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
        headers=safe_headers,
        properties=safe_properties,
        body=body_text,
        body_encoding=body_encoding,
    )


def dead_letter_archive(
    *,
    body: bytes | str | None,
    headers: Mapping[str, Any] | None,
    properties: Mapping[str, Any] | None,
    exchange: str = "",
    routing_key: str = "",
) -> ArchiveResult:
    """Store one message received from `dead_letters`; idempotent, so a redelivery changes nothing."""
    delivery = {"body": body, "headers": headers, "properties": properties, "exchange": exchange}
    return dead_letters_archive(deliveries=[{**delivery, "routing_key": routing_key}])[0]


def dead_letters_archive(*, deliveries: Sequence[Mapping[str, Any]]) -> list[ArchiveResult]:
    """Archive a batch of deliveries (dead_letter_archive's keyword arguments) in ONE transaction.

    Called by the archiver, which acks the batch only after this returned: a crash before that
    redelivers all of it, and each letter's fingerprint makes archiving it again a no-op. A
    handful of queries per batch, not per letter. Failure notes (see task_failure_publish) in the
    batch are recorded, not archived; the results are those of the dead letters, in order.
    """
    notes = [_failure_note(delivery) for delivery in deliveries if _is_failure_note(delivery)]
    letters = [
        _dead_letter_from_delivery(**delivery) for delivery in deliveries if not _is_failure_note(delivery)
    ]
    with transaction.atomic():
        _lock_tasks(({letter.task_id for letter in letters} | {note["task_id"] for note in notes}) - {""})
        # Notes first: a worker sends its note before rejecting, so it precedes its letter.
        for note in notes:
            task_failure_record(**note)
        existing = {
            letter.fingerprint: letter
            for letter in DeadLetter.objects.filter(
                fingerprint__in=[letter.fingerprint for letter in letters]
            )
        }
        fresh: dict[str, DeadLetter] = {}
        for letter in letters:
            if letter.fingerprint not in existing:
                fresh.setdefault(letter.fingerprint, letter)
        _join_failures(
            [letter for letter in fresh.values() if letter.reason == "rejected" and letter.task_id]
        )
        try:
            with transaction.atomic():
                DeadLetter.objects.bulk_create(fresh.values())
        except IntegrityError:
            # Another archiver stored some of them meanwhile: store the rest one by one.
            for fingerprint, letter in list(fresh.items()):
                try:
                    with transaction.atomic():
                        letter.save()
                except IntegrityError:
                    existing[fingerprint] = DeadLetter.objects.get(fingerprint=fingerprint)
                    del fresh[fingerprint]
    results = []
    reported: set[str] = set()
    for letter in letters:
        created = letter.fingerprint in fresh and letter.fingerprint not in reported
        reported.add(letter.fingerprint)
        stored = fresh.get(letter.fingerprint) or existing[letter.fingerprint]
        results.append(ArchiveResult(stored, created=created))
    return results


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
