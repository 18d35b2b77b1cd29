"""Deleting what the archive no longer needs; run hourly by the archiver."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from deadletters.models import DeadLetter, TaskFailure
from infrastructure.postgres import delete_in_chunks


def task_failures_prune(
    *, older_than: timedelta | None = None, between_chunks: Callable[[], None] | None = None
) -> int:
    """Delete failure rows no dead letter claimed (the reject never happened); returns how many."""
    older_than = older_than or timedelta(days=settings.DLQ_TASK_FAILURE_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    return delete_in_chunks(
        TaskFailure.objects.filter(failed_at__lt=cutoff).order_by("failed_at"), between_chunks=between_chunks
    )


def dead_letters_prune(
    *, older_than: timedelta | None = None, between_chunks: Callable[[], None] | None = None
) -> int:
    """Delete resolved dead letters (replayed or discarded) not acted on within the retention.

    Run hourly by the archiver. Age counts from the last replay or discard (`updated_at`), so a
    letter resolved today is kept its full retention however long ago it died. A `new` letter is
    never deleted, however old: it is work nobody has looked at yet. The audit rows go with their
    letter; returns how many letters were deleted.
    """
    if older_than is None:
        older_than = timedelta(days=settings.DLQ_RESOLVED_RETENTION_DAYS)
    resolved = DeadLetter.objects.filter(status__in=DeadLetter.RESOLVED_STATUSES)
    return delete_in_chunks(
        resolved.filter(updated_at__lt=timezone.now() - older_than).order_by("pk"),
        between_chunks=between_chunks,
    )
