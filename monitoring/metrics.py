"""The project's metric names, and the Celery workers' instruments; docs/monitoring.md lists them all.

Two kinds:
- instruments (counters, histograms) are updated where the thing happens, in the process it
  happens in, and defined beside it: web (chat/metrics.py: messages stored, rate-limited frames),
  relay (messaging/metrics.py: publish latency), Celery workers (below: task outcomes and
  durations; see worker_metrics.py for their endpoint);
- scrape-time values (open sockets, outbox backlog, queue depth, dead letters, alert levels) are
  computed from PostgreSQL, Redis and RabbitMQ when /metrics is read, by collectors.py, so they
  are right whichever web process answers and however many there are. Their names are here too.

This module imports prometheus_client, which picks single- or multi-process mode from
PROMETHEUS_MULTIPROC_DIR on first import: Celery workers set it before (worker_metrics.py).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CELERY_TASKS_SUCCEEDED = Counter("celery_tasks_succeeded", "Tasks that returned normally.", ["task"])
CELERY_TASKS_FAILED = Counter(
    "celery_tasks_failed", "Tasks that raised (a bug, or retries exhausted).", ["task"]
)
CELERY_TASKS_RETRIED = Counter("celery_tasks_retried", "Task runs that ended in a scheduled retry.", ["task"])
CELERY_TASKS_REJECTED = Counter(
    "celery_tasks_rejected",
    "Task messages rejected without requeue (invalid payload, unknown task): dead-lettered.",
    ["task"],
)
CELERY_TASK_DURATION_SECONDS = Histogram(
    "celery_task_duration_seconds",
    "Time a task's body ran, whatever its outcome.",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

# Scrape-time metrics (collectors.py).
OPEN_SOCKETS = "chat_open_sockets"
OUTBOX_PENDING = "chat_outbox_pending_events"
OUTBOX_OLDEST_AGE = "chat_outbox_oldest_pending_age_seconds"
QUEUE_MESSAGES = "chat_queue_messages"
QUEUE_CONSUMERS = "chat_queue_consumers"
DEAD_LETTERS = "chat_dead_letters"
DEAD_LETTERS_OLDEST_AGE = "chat_dead_letters_oldest_unresolved_age_seconds"
ALERT_LEVEL = "chat_alert_level"
SOURCE_UP = "chat_metrics_source_up"

PROJECT_METRIC_NAMES: tuple[str, ...] = (
    "chat_messages_stored_total",
    "chat_rate_limited_frames_total",
    "chat_relay_publish_seconds",
    OPEN_SOCKETS,
    OUTBOX_PENDING,
    OUTBOX_OLDEST_AGE,
    QUEUE_MESSAGES,
    QUEUE_CONSUMERS,
    DEAD_LETTERS,
    DEAD_LETTERS_OLDEST_AGE,
    ALERT_LEVEL,
)
WORKER_METRIC_NAMES: tuple[str, ...] = (
    "celery_tasks_succeeded_total",
    "celery_tasks_failed_total",
    "celery_tasks_retried_total",
    "celery_tasks_rejected_total",
    "celery_task_duration_seconds",
)
