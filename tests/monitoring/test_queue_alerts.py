"""Queue alerts of the periodic check: messages without a consumer, backlogs too slow to drain."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from kombu import Connection, Producer

from messaging.topology import MONITORING_QUEUE
from monitoring.models import AlertLevel, AlertState, QueueSample
from monitoring.selectors import QueueStat
from monitoring.services import alerts_check, queue_findings

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def drain_settings(settings):
    settings.QUEUE_BACKLOG_MIN_MESSAGES = 100
    settings.QUEUE_DRAIN_WARNING_SECONDS = 600
    settings.QUEUE_RATE_WINDOW_SECONDS = 300


def test_queue_with_messages_and_no_consumer_warns_once(broker_url, mailoutbox, settings):
    settings.ADMINS = [("Ops", "ops@example.com")]
    with Connection(broker_url) as conn:
        Producer(conn.channel()).publish(
            {"n": 1}, exchange=MONITORING_QUEUE.exchange, routing_key="monitoring"
        )
        try:
            alerts_check()
            alerts_check()
        finally:
            MONITORING_QUEUE.bind(conn.channel()).purge()

    state = AlertState.objects.get(key="queue_without_consumer:monitoring")
    assert state.level == AlertLevel.WARNING
    assert len([m for m in mailoutbox if "queue_without_consumer:monitoring" in m.subject]) == 1


def test_backlog_that_would_take_too_long_to_drain_warns(drain_settings):
    now = timezone.now()
    # 3000 -> 2900 in 200 s is 0.5/s: 2900 messages need about 97 minutes.
    QueueSample.objects.create(
        queue="analytics", messages=3000, consumers=1, sampled_at=now - timedelta(seconds=200)
    )

    [_, drain] = queue_findings(stats=[QueueStat("analytics", True, 2900, 1)], now=now)

    assert drain.key == "queue_drain:analytics"
    assert drain.level == AlertLevel.WARNING


def test_backlog_draining_fast_enough_is_ok(drain_settings):
    now = timezone.now()
    # 3000 -> 1000 in 200 s is 10/s: 1000 messages need 100 s.
    QueueSample.objects.create(
        queue="analytics", messages=3000, consumers=1, sampled_at=now - timedelta(seconds=200)
    )

    [_, drain] = queue_findings(stats=[QueueStat("analytics", True, 1000, 1)], now=now)

    assert drain.level == AlertLevel.OK


def test_backlog_not_shrinking_warns(drain_settings):
    now = timezone.now()
    QueueSample.objects.create(
        queue="analytics", messages=500, consumers=1, sampled_at=now - timedelta(seconds=200)
    )

    [_, drain] = queue_findings(stats=[QueueStat("analytics", True, 800, 1)], now=now)

    assert drain.level == AlertLevel.WARNING
    assert "not draining" in drain.summary


def test_backlog_without_enough_history_keeps_its_level(drain_settings):
    now = timezone.now()
    QueueSample.objects.create(
        queue="analytics", messages=800, consumers=1, sampled_at=now - timedelta(seconds=30)
    )

    findings = queue_findings(stats=[QueueStat("analytics", True, 800, 1)], now=now)

    assert [f.key for f in findings] == ["queue_without_consumer:analytics"]
