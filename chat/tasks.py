"""Celery tasks of the notifications queues: thin wrappers over chat.notifications.

`deliver_mention_notifications` runs on the `notifier` worker (Procfile, queue `notifications`),
`deliver_vip_mention_notifications` on `notifier_vip` (queue `notifications_vip`): the same
service, on capacity of its own for VIP mentions. Beat queues the fallback email sweep on the
normal queue every NOTIFICATION_ACK_SWEEP_SECONDS.
"""

from __future__ import annotations

import logging
import smtplib
from typing import Any

import redis
from celery import shared_task
from django.db import InterfaceError, OperationalError

from chat.notifications import mention_notifications_deliver, notification_fallback_emails_send
from chat.task_logging import FALLBACK_SWEEP_TASK
from messaging.events import MENTION, VIP_MENTION, InvalidEvent
from messaging.retrying import DeadLetteringTask

logger = logging.getLogger(__name__)

# Errors that may pass: database, Redis (presence, channel layer) or mail server unavailable.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, redis.RedisError, smtplib.SMTPException, OSError)


# Both mention tasks fail the same way.
MENTION_TASK_OPTIONS: dict[str, Any] = {
    "base": DeadLetteringTask,
    "retry_for": TRANSIENT_ERRORS,
    "reject_for": (InvalidEvent,),
    "max_retries": 5,
    # Delays drawn from [0, 2], [0, 4] ... [0, 32] s: the events' expiry still applies to a retry.
    "retry_backoff": 2,
    "retry_backoff_max": 60,
}


@shared_task(name=MENTION.task_name, **MENTION_TASK_OPTIONS)
def deliver_mention_notifications(events: Any) -> dict[str, int]:
    """Deliver one relay message's mention events (usually one); safe under redelivery.

    Outcomes (messaging.retrying): malformed events -> rejected without requeue (dead-lettered,
    retrying cannot help); database, Redis or SMTP unavailable -> retried with backoff (a late
    retry drops the events past their expiry), then dead-lettered; anything else is a bug and
    raises (also dead-lettered, never acked as done).
    """
    return _delivery_counts(events)


@shared_task(name=VIP_MENTION.task_name, **MENTION_TASK_OPTIONS)
def deliver_vip_mention_notifications(events: Any) -> dict[str, int]:
    """deliver_mention_notifications for a VIP author's mentions, on the VIP notifier; the same
    outcomes. A retry goes back to the VIP queue (Celery republishes to the message's exchange
    and routing key)."""
    return _delivery_counts(events)


def _delivery_counts(events: Any) -> dict[str, int]:
    result = mention_notifications_deliver(events=events)
    return {
        "delivered": result.delivered,
        "pushed": result.pushed,
        "duplicates": result.duplicates,
        "expired": result.expired,
        "skipped": result.skipped,
    }


@shared_task(name=FALLBACK_SWEEP_TASK)  # an idle sweep logs nothing (chat/task_logging.py)
def send_notification_fallback_emails() -> dict[str, int]:
    """Email the pushes no page acknowledged in time (a batch; beat runs this every few seconds).

    Outcomes: database or mail server unavailable -> logged, and the next sweep (seconds later)
    is the retry, since every due push stays due until it is emailed; anything else is a bug and
    raises (rejected, so dead-lettered, and the next sweep runs anyway).
    """
    try:
        result = notification_fallback_emails_send()
    except (OperationalError, InterfaceError) as error:
        logger.warning(
            "fallback emails wait for the next sweep: PostgreSQL is unavailable (%s)", type(error).__name__
        )
        return {"emailed": 0, "unsent": 0}
    except (smtplib.SMTPException, OSError) as error:
        logger.warning(
            "fallback emails wait for the next sweep: the mail server is unavailable (%s)",
            type(error).__name__,
        )
        return {"emailed": 0, "unsent": 0}
    return {"emailed": result.emailed, "unsent": result.unsent}
