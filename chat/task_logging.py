"""Log filters for Celery's per-task lines, attached to Celery's loggers by settings.LOGGING.

A worker logs every task's receipt and success at INFO, and beat every task it sends. The
fallback-email sweep runs every NOTIFICATION_ACK_SWEEP_SECONDS (5) and nearly always finds
nothing: three lines every 5 s between the notifier and beat, some 50,000 a day, that say nothing.
`IdleFallbackSweepFilter` drops them; a sweep that emailed or could not email still logs its
result (`succeeded ...: {'emailed': 2, 'unsent': 0}`), and failures, retries and the sweep's own
warnings are never filtered.

Loaded while logging is configured: it must not import Django models or the Celery app.
"""

from __future__ import annotations

import logging

from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS
from celery.utils.saferepr import saferepr

FALLBACK_SWEEP_TASK = "chat.send_notification_fallback_emails"
# What the sweep returns when it found nothing due (and what the worker logs of it, repr'd).
FALLBACK_SWEEP_IDLE_RESULT = {"emailed": 0, "unsent": 0}
_IDLE_RESULT_REPR = saferepr(FALLBACK_SWEEP_IDLE_RESULT)
# celery.beat's line for each task it sends: ("Scheduler: Sending due task %s (%s)", entry, task).
_BEAT_SENDING = "Scheduler: Sending due task"


class IdleFallbackSweepFilter(logging.Filter):
    """Drops the sweep's receipt and beat's sending line, and its success line when it was idle."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("name") == FALLBACK_SWEEP_TASK:
            if record.msg == LOG_RECEIVED:
                return False  # the success (or failure) line follows and says what it did
            if record.msg == LOG_SUCCESS:
                return data.get("return_value") != _IDLE_RESULT_REPR
        if isinstance(record.msg, str) and record.msg.startswith(_BEAT_SENDING):
            return not (isinstance(record.args, tuple) and FALLBACK_SWEEP_TASK in record.args)
        return True
