"""Why a task failed for good: recorded by the worker, joined to its dead letter by the archiver.

RabbitMQ dead-letters the original message and only adds `x-death`; it cannot add the worker's
error. Republishing a modified copy to the DLX from the worker would need confirms and would lose
RabbitMQ's own `x-death` bookkeeping. So the worker commits a TaskFailure row keyed by the Celery
task id before the message is rejected (worker_hooks.py), and the archiver (archive.py) joins it
by task id. Both sides take the same transaction-scoped advisory lock on the task id, and
whichever comes second completes the join, so the order does not matter (Celery's intake-level
rejects, unknown tasks, signal after the reject). Expired and overflowed messages never reach a
worker: they carry only `x-death`, and the archive describes them from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from celery import current_app
from django.db import connection, transaction
from django.utils import timezone

from deadletters.models import DeadLetter, TaskFailure
from deadletters.services.delivery_rows import body_bytes
from messaging.topology import DEAD_LETTER_EXCHANGE

# A failure note a worker sent through the broker because it could not reach the database.
FAILURE_NOTE_HEADER = "x-task-failure-note"
FAILURE_NOTE_ROUTING_KEY = "deadletters.task_failure"


def is_failure_note(delivery: Mapping[str, Any]) -> bool:
    """Whether a delivery from `dead_letters` is a failure note (task_failure_publish), not a letter."""
    return bool((delivery.get("headers") or {}).get(FAILURE_NOTE_HEADER))


def failure_note_fields(delivery: Mapping[str, Any]) -> dict[str, Any]:
    """A failure note's content as task_failure_record's keyword arguments; raises on a note that
    is no JSON object (the archiver then stores the delivery as a minimal row)."""
    note = json.loads(body_bytes(delivery.get("body"), "utf-8").decode("utf-8"))
    attempts = note.get("attempts")
    return {
        "task_id": str(note.get("task_id") or ""),
        "task_name": str(note.get("task_name") or ""),
        "error_class": str(note.get("error_class") or ""),
        "error_message": str(note.get("error_message") or ""),
        "traceback": str(note.get("traceback") or ""),
        "attempts": attempts if isinstance(attempts, int) else None,
    }


def lock_task_ids(task_ids: set[str]) -> None:
    """Serialise the archiver's and the worker's halves of the failure join for each task id, until
    the transaction ends. Taken in sorted order, so two archivers locking the same ids cannot
    deadlock."""
    if not task_ids:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('deadletters:' || id, 0)) "
            "FROM (SELECT id FROM unnest(%s::text[]) AS t(id) ORDER BY id) AS sorted",
            [sorted(task_ids)],
        )


def task_failures_join(letters: list[DeadLetter]) -> None:
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
        lock_task_ids({task_id})
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
    note = {
        "task_id": task_id,
        "task_name": task_name,
        "error_class": error_class,
        "error_message": error_message,
        "traceback": traceback,
        "attempts": attempts,
    }
    # CELERY_BROKER_TRANSPORT_OPTIONS has confirm_publish: publish returns once RabbitMQ has it.
    with current_app.producer_or_acquire() as producer:
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
