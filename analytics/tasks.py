"""Celery tasks of the analytics queue: thin wrappers over analytics.services.

Delivery is at least once (acks_late: a message is acked only after the task returned, that
is after its transaction committed; a killed worker's message is redelivered). Counting is
exactly once because the service records each event id in the same transaction as the counts.
Exactly-once processing, not exactly-once delivery.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from django.conf import settings
from django.db import InterfaceError, OperationalError

from analytics.services import (
    EventsPastLedgerHorizon,
    chat_events_record,
    ledger_horizon,
    processed_events_prune,
)
from messaging.events import MESSAGE_CREATED, InvalidEvent

logger = logging.getLogger(__name__)


def retry_delay(retries: int) -> float:
    """Exponential backoff, jittered (half to all of it) so concurrent workers do not retry in lockstep."""
    ceiling = min(settings.ANALYTICS_RETRY_MAX_DELAY, settings.ANALYTICS_RETRY_BASE_DELAY * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


@shared_task(
    name=MESSAGE_CREATED.task_name,
    bind=True,
    max_retries=settings.ANALYTICS_RETRY_MAX,
)
def record_chat_events(self: Task, events: Any) -> dict[str, int]:
    """Count one relay batch of chat.message.created events; runs once per task message.

    Outcomes: invalid payload -> rejected without requeue (RabbitMQ dead-letters it; retrying
    cannot help); events created before the ledger horizon -> the others are counted, then the
    message is rejected without requeue, so a person sees in the dead letters what was not
    counted and why; database unavailable -> retried with backoff, and after the last retry the
    failure is rejected, so dead-lettered too (acks_on_failure_or_timeout=False); anything else
    is a bug and raises (also rejected, never acked as done).
    """
    try:
        result = chat_events_record(events=events)
    except InvalidEvent as error:
        logger.warning("dead-lettering an invalid analytics batch: %s", error)
        raise Reject(str(error), requeue=False) from error
    except (OperationalError, InterfaceError) as error:
        raise self.retry(exc=error, countdown=retry_delay(self.request.retries)) from error
    if result.too_old:
        # Rejected after the commit: a redelivery or replay of this message finds the counted
        # events in the ledger and refuses the old ones again, so nothing is ever counted twice.
        error = EventsPastLedgerHorizon(too_old=result.too_old, batch=len(events), horizon=ledger_horizon())
        logger.warning("dead-lettering analytics events past the ledger horizon: %s", error)
        raise Reject(str(error), requeue=False) from error
    return {"counted": result.counted, "duplicates": result.duplicates}


# A failed prune (database down) is acked, not dead-lettered: the next beat, an hour later, is
# the retry, and it deletes whatever this one left.
@shared_task(name="analytics.prune_processed_events", acks_on_failure_or_timeout=True)
def prune_processed_events() -> int:
    """Delete ledger rows past ANALYTICS_LEDGER_RETENTION_DAYS; sent hourly by Celery beat."""
    pruned = processed_events_prune()
    logger.info("pruned %d analytics ledger rows", pruned)
    return pruned
