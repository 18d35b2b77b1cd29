"""Scrape-time metrics and the /metrics exposition.

The values here are computed when Prometheus reads /metrics, from the systems that hold the
truth (PostgreSQL, Redis, RabbitMQ), so any web process gives the same answer. Each source is
read with a short timeout, and a failing source only drops its own metrics and sets
chat_metrics_source_up{source=...} to 0: the scrape still answers. RabbitMQ is probed at most
once per METRICS_QUEUE_CACHE_SECONDS per process, so frequent scrapes do not open a connection
each time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from django.conf import settings
from django.db import DatabaseError
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from messaging.topology import declared_queues
from monitoring import metrics, selectors

logger = logging.getLogger(__name__)


class SourceUnreadable(Exception):
    pass


def _outbox() -> list[Metric]:
    outbox = selectors.outbox_backlog()
    return [
        GaugeMetricFamily(
            metrics.OUTBOX_PENDING, "Outbox events not yet confirmed by RabbitMQ.", value=outbox.pending
        ),
        GaugeMetricFamily(
            metrics.OUTBOX_OLDEST_AGE,
            "Age of the oldest outbox event not yet confirmed by RabbitMQ (0 when none is pending).",
            value=outbox.oldest_age_seconds,
        ),
    ]


def _dead_letters() -> list[Metric]:
    backlog = selectors.dead_letter_backlog()
    if backlog is None:
        return []
    by_status = GaugeMetricFamily(metrics.DEAD_LETTERS, "Archived dead letters by status.", labels=["status"])
    for status, count in sorted(backlog.by_status.items()):
        by_status.add_metric([status], count)
    return [
        by_status,
        GaugeMetricFamily(
            metrics.DEAD_LETTERS_OLDEST_AGE,
            "Age of the oldest dead letter nobody replayed or discarded (0 when none).",
            value=backlog.oldest_unresolved_age_seconds,
        ),
    ]


def _alerts() -> list[Metric]:
    levels = GaugeMetricFamily(
        metrics.ALERT_LEVEL,
        "Level of each alert of the periodic check: 0 OK, 1 WARNING, 2 CRITICAL.",
        labels=["alert"],
    )
    for state in selectors.alert_states():
        levels.add_metric([state.key], state.level)
    return [levels]


def _open_sockets() -> list[Metric]:
    try:
        count = selectors.open_socket_count()
    except selectors.SourceUnavailable as error:
        raise SourceUnreadable(str(error)) from error
    return [
        GaugeMetricFamily(metrics.OPEN_SOCKETS, "Open chat WebSockets in all web processes.", value=count)
    ]


class _QueueReader:
    """Messages ready and consumers of every monitored queue, from RabbitMQ, cached per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._stats: list[selectors.QueueStat] | None = None
        self._error = ""

    def _current(self) -> list[selectors.QueueStat] | None:
        # One probe at a time; scrapes arriving meanwhile wait at most one timeout, then reuse it.
        with self._lock:
            if time.monotonic() - self._read_at >= settings.METRICS_QUEUE_CACHE_SECONDS:
                try:
                    self._stats = selectors.queue_stats(queues=declared_queues())
                except selectors.SourceUnavailable as error:
                    self._stats, self._error = None, str(error)
                self._read_at = time.monotonic()
            return self._stats

    def __call__(self) -> list[Metric]:
        stats = self._current()
        if stats is None:
            raise SourceUnreadable(self._error)
        messages = GaugeMetricFamily(
            metrics.QUEUE_MESSAGES, "Messages ready in each monitored RabbitMQ queue.", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            metrics.QUEUE_CONSUMERS, "Consumers attached to each monitored RabbitMQ queue.", labels=["queue"]
        )
        for stat in stats:
            if stat.exists:
                messages.add_metric([stat.name], stat.messages)
                consumers.add_metric([stat.name], stat.consumers)
        return [messages, consumers]


class ScrapeTimeCollector(Collector):
    """Every scrape-time metric; a source that fails drops only its own metrics."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], list[Metric]]] = {
            "outbox": _outbox,
            "dead_letters": _dead_letters,
            "alerts": _alerts,
            "redis_presence": _open_sockets,
            "broker_queues": _QueueReader(),
        }

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            metrics.SOURCE_UP,
            "Whether the last read of each metrics source succeeded (1) or failed (0).",
            labels=["source"],
        )
        for name, read in self.sources.items():
            try:
                families = read()
            except (DatabaseError, SourceUnreadable) as error:
                logger.warning(
                    "metrics: source %s not readable: %s", name, str(error).strip().splitlines()[0]
                )
                up.add_metric([name], 0.0)
                continue
            up.add_metric([name], 1.0)
            yield from families
        yield up


SCRAPE_COLLECTORS: tuple[Collector, ...] = (ScrapeTimeCollector(),)


class _Exposition:
    """The process's instruments plus the scrape-time collectors, read as one registry."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self.sources = tuple(sources)

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


def multiprocess_registry() -> CollectorRegistry:
    """The sum of every process's instruments in PROMETHEUS_MULTIPROC_DIR (prefork workers)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def web_metrics_text() -> bytes:
    """The body of the web process's /metrics: its own instruments and the scrape-time values."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own: Collector = multiprocess_registry()
    else:
        own = REGISTRY
    return generate_latest(_Exposition((own, *SCRAPE_COLLECTORS)))  # type: ignore[arg-type]
