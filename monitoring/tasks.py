"""The periodic alert check, run by Celery beat (CELERY_BEAT_SCHEDULE) on the `monitoring` queue.

A worker of its own consumes that queue (Procfile `monitor`), so the check still runs, and
reports, when the analytics workers are gone.
"""

from __future__ import annotations

from celery import shared_task

from monitoring.services import alerts_check


# A failed run (database down) is acked, not dead-lettered: the next beat, ALERT_CHECK_SECONDS
# later, is the retry, and a dead letter per failed check would itself raise the DLQ alert.
@shared_task(name="monitoring.check_alerts", acks_on_failure_or_timeout=True)
def check_alerts() -> dict[str, str]:
    """Evaluate every alert once; returns the level changes (key -> new level) for the log."""
    return {transition.key: transition.level.label for transition in alerts_check()}
