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

from celery import Task
from celery.exceptions import Reject
from django.conf import settings
from django.db import InterfaceError, OperationalError

from analytics.services import InvalidEvent, chat_events_record
from chatproject.celery import app

logger = logging.getLogger(__name__)


def retry_delay(retries: int) -> float:
    """Exponential backoff, jittered (half to all of it) so concurrent workers do not retry in lockstep."""
    ceiling = min(settings.ANALYTICS_RETRY_MAX_DELAY, settings.ANALYTICS_RETRY_BASE_DELAY * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


@app.task(
    name="analytics.record_chat_events",
    bind=True,
    max_retries=settings.ANALYTICS_RETRY_MAX,
)
def record_chat_events(self: Task, events: Any) -> dict[str, int]:
    """Count one relay batch of chat.message.created events; runs once per task message.

    Outcomes: invalid payload -> rejected without requeue (RabbitMQ dead-letters it; retrying
    cannot help); database unavailable -> retried with backoff, and after the last retry the
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
    return {"counted": result.counted, "duplicates": result.duplicates}
