"""The periodic alert check: evaluate dead letters and queues, persist each alert's level, and
notify on every level change only (fired, escalated, eased, resolved), never on a repeat."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from messaging.topology import declared_queues
from monitoring import selectors
from monitoring.models import AlertLevel, AlertState, QueueSample

logger = logging.getLogger(__name__)

DEAD_LETTERS_KEY = "dead_letters"


@dataclass(frozen=True)
class Finding:
    """What one check sees now: the level it deserves and a one-line reason."""

    key: str
    level: AlertLevel
    summary: str


@dataclass(frozen=True)
class AlertTransition:
    key: str
    previous: AlertLevel
    level: AlertLevel
    summary: str
    changed_at: datetime

    @property
    def resolved(self) -> bool:
        return self.level == AlertLevel.OK


def duration_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def dead_letter_finding(
    *,
    backlog: selectors.DeadLetterBacklog,
    warning_count: int | None = None,
    critical_count: int | None = None,
    warning_age_seconds: float | None = None,
    critical_age_seconds: float | None = None,
) -> Finding:
    """The level of the dead-letter backlog: the worse of its count and its oldest one's age.

    Thresholds default to the DLQ_* settings; a count threshold of 0 disables it.
    """
    warning_count = settings.DLQ_WARNING_COUNT if warning_count is None else warning_count
    critical_count = settings.DLQ_CRITICAL_COUNT if critical_count is None else critical_count
    warning_age = settings.DLQ_WARNING_AGE_SECONDS if warning_age_seconds is None else warning_age_seconds
    critical_age = settings.DLQ_CRITICAL_AGE_SECONDS if critical_age_seconds is None else critical_age_seconds
    count, age = backlog.unresolved, backlog.oldest_unresolved_age_seconds
    level = AlertLevel.OK
    if (warning_count and count >= warning_count) or (count and warning_age and age >= warning_age):
        level = AlertLevel.WARNING
    if (critical_count and count >= critical_count) or (count and critical_age and age >= critical_age):
        level = AlertLevel.CRITICAL
    noun = "dead letter" if count == 1 else "dead letters"
    summary = f"{count} unresolved {noun}"
    if count:
        summary += f", oldest {duration_text(age)}"
    summary += f" (warning at {warning_count}, critical at {critical_count})"
    return Finding(DEAD_LETTERS_KEY, level, summary)


def queue_findings(*, stats: list[selectors.QueueStat], now: datetime) -> list[Finding]:
    """Per queue: messages waiting with nobody consuming, and a backlog too slow to drain.

    The drain rate is the net fall of the queue's depth since the oldest sample within
    QUEUE_RATE_WINDOW_SECONDS; with less than half a window of history there is no drain
    finding yet (the alert keeps its level rather than guessing).
    """
    window = timedelta(seconds=settings.QUEUE_RATE_WINDOW_SECONDS)
    findings: list[Finding] = []
    for stat in stats:
        if not stat.exists:
            continue
        idle = stat.messages > 0 and stat.consumers == 0
        findings.append(
            Finding(
                f"queue_without_consumer:{stat.name}",
                AlertLevel.WARNING if idle else AlertLevel.OK,
                f"queue {stat.name}: {stat.messages} messages ready, {stat.consumers} consumers",
            )
        )
        drain = _drain_finding(stat=stat, now=now, window=window)
        if drain is not None:
            findings.append(drain)
    return findings


def _drain_finding(*, stat: selectors.QueueStat, now: datetime, window: timedelta) -> Finding | None:
    key = f"queue_drain:{stat.name}"
    if stat.messages < settings.QUEUE_BACKLOG_MIN_MESSAGES or stat.consumers == 0:
        # Small backlogs drain by themselves; one without consumers is the other alert's.
        return Finding(key, AlertLevel.OK, f"queue {stat.name}: {stat.messages} messages ready")
    then = selectors.queue_depth_then(queue=stat.name, since=now - window)
    if then is None or (now - then.sampled_at) < window / 2:
        return None
    elapsed = (now - then.sampled_at).total_seconds()
    rate = (then.messages - stat.messages) / elapsed
    limit = settings.QUEUE_DRAIN_WARNING_SECONDS
    if rate <= 0:
        return Finding(
            key,
            AlertLevel.WARNING,
            f"queue {stat.name}: {stat.messages} messages ready and not draining "
            f"(was {then.messages} {duration_text(elapsed)} ago)",
        )
    eta = stat.messages / rate
    level = AlertLevel.WARNING if eta > limit else AlertLevel.OK
    return Finding(
        key,
        level,
        f"queue {stat.name}: {stat.messages} messages ready, about {duration_text(eta)} to drain "
        f"at {rate:.1f}/s (limit {duration_text(limit)})",
    )


def alerts_check(*, now: datetime | None = None) -> list[AlertTransition]:
    """Called by the periodic task (every ALERT_CHECK_SECONDS): evaluate, persist, notify changes.

    Unreadable sources leave their alerts as they were (logged), rather than resolving them.
    """
    now = now or timezone.now()
    findings: list[Finding] = []
    backlog = selectors.dead_letter_backlog(now=now)
    if backlog is not None:
        findings.append(dead_letter_finding(backlog=backlog))
    try:
        stats = selectors.queue_stats(queues=declared_queues())
    except selectors.SourceUnavailable as error:
        logger.warning("alert check: queues not checked: %s", error)
    else:
        findings.extend(queue_findings(stats=stats, now=now))
        queue_samples_record(stats=stats, now=now)
    return alert_states_update(findings=findings, now=now)


def queue_samples_record(*, stats: list[selectors.QueueStat], now: datetime) -> None:
    """Keep this check's depths for the drain rate, and forget those older than two windows."""
    QueueSample.objects.bulk_create(
        QueueSample(queue=s.name, messages=s.messages, consumers=s.consumers, sampled_at=now)
        for s in stats
        if s.exists
    )
    keep = timedelta(seconds=2 * settings.QUEUE_RATE_WINDOW_SECONDS)
    QueueSample.objects.filter(sampled_at__lt=now - keep).delete()


def alert_states_update(*, findings: list[Finding], now: datetime | None = None) -> list[AlertTransition]:
    """Store each finding's level; a changed level is a transition, notified once on commit.

    Rows are locked, so two checks running at once (a doubled beat) notify a change only once.
    """
    from monitoring.alert_delivery import alert_deliver

    now = now or timezone.now()
    transitions: list[AlertTransition] = []
    with transaction.atomic():
        for finding in findings:
            state, _ = AlertState.objects.select_for_update().get_or_create(
                key=finding.key, defaults={"changed_at": now}
            )
            if state.level != finding.level:
                transitions.append(
                    AlertTransition(
                        key=finding.key,
                        previous=AlertLevel(state.level),
                        level=finding.level,
                        summary=finding.summary,
                        changed_at=now,
                    )
                )
                state.level = finding.level
                state.changed_at = now
            state.summary = finding.summary
            state.checked_at = now
            state.save()
        # Side effects, once the new levels are committed, for each level change:
        # - the error log (ERROR when firing or escalating, WARNING when easing or resolved);
        # - mail_admins;
        # - the ALERT_WEBHOOK_URL webhook (Slack-compatible JSON), when set;
        # - the live staff banner (channel layer group of the staff alert sockets).
        for transition in transitions:
            transaction.on_commit(partial(alert_deliver, transition=transition))
    return transitions
