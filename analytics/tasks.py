"""Celery tasks of the analytics queue: thin wrappers over analytics.services.

Delivery is at least once (acks_late: a message is acked only after the task returned, that
is after its transaction committed; a killed worker's message is redelivered). Counting is
exactly once because the service records each event id in the same transaction as the counts.
Exactly-once processing, not exactly-once delivery.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from analytics.services import (
    EventsPastLedgerHorizon,
    chat_events_record,
    ledger_horizon,
    processed_events_prune,
)
from messaging.events import MESSAGE_CREATED, InvalidEvent
from messaging.retrying import DeadLetteringTask

logger = logging.getLogger(__name__)


@shared_task(
    base=DeadLetteringTask,
    name=MESSAGE_CREATED.task_name,
    retry_for=(OperationalError, InterfaceError),
    reject_for=(InvalidEvent, EventsPastLedgerHorizon),
    max_retries=settings.ANALYTICS_RETRY_MAX,
    retry_backoff=settings.ANALYTICS_RETRY_BASE_DELAY,
    retry_backoff_max=settings.ANALYTICS_RETRY_MAX_DELAY,
)
def record_chat_events(events: Any) -> dict[str, int]:
    """Count one relay batch of chat.message.created events; runs once per task message.

    Outcomes (messaging.retrying): invalid payload -> rejected without requeue (RabbitMQ
    dead-letters it; retrying cannot help); events created before the ledger horizon -> the
    others are counted, then the message is rejected without requeue, so a person sees in the
    dead letters what was not counted and why; database unavailable -> retried with backoff, and
    after the last retry the failure is dead-lettered too; anything else is a bug and raises
    (also dead-lettered, never acked as done).
    """
    result = chat_events_record(events=events)
    if result.too_old:
        # Raised after the commit: a redelivery or replay of this message finds the counted
        # events in the ledger and refuses the old ones again, so nothing is ever counted twice.
        raise EventsPastLedgerHorizon(too_old=result.too_old, batch=len(events), horizon=ledger_horizon())
    return {"counted": result.counted, "duplicates": result.duplicates}


# A failed prune (database down) is acked, not dead-lettered: the next beat, an hour later, is
# the retry, and it deletes whatever this one left.
@shared_task(name="analytics.prune_processed_events", acks_on_failure_or_timeout=True)
def prune_processed_events() -> int:
    """Delete ledger rows past ANALYTICS_LEDGER_RETENTION_DAYS; sent hourly by Celery beat."""
    pruned = processed_events_prune()
    logger.info("pruned %d analytics ledger rows", pruned)
    return pruned
