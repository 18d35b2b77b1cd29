"""`manage.py bench_priority`: VIP notification latency while a large backlog of normal ones drains.

Runs in a RabbitMQ vhost of its own (deleted afterwards) with its own notifier process (the
Procfile's `notifier` command), so no real worker sees the benchmark's tasks. Task messages are
built and published by the relay's own code (`task_message_build` of messaging.wire, EventPublisher
of messaging.publishing, with confirms), one mention event per message as the relay publishes them;
the worker runs the real delivery service, mailing an offline user through the locmem email
backend. Latency is the ledger's `delivered_at` minus the event's `queued_at` (the moment it was
handed to the publisher), both from this machine's clock. Its rows are deleted at the end.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import InterfaceError, OperationalError
from django.db import connection as db_connection
from django.utils import timezone
from kombu import Connection

from bench.procfile import (
    ProcessNotReady,
    ProcfileProcess,
    child_process_env,
    procfile_argv,
    queue_consumers,
    wait_until,
)
from chat.models import Message, NotificationDelivery, Room
from messaging.events import MENTION, PRIORITY_HIGH, PRIORITY_LOW, event_envelope, mention_fields
from messaging.publishing import EventPublisher
from messaging.topology import (
    ScratchVhostError,
    notifications_queue,
    scratch_vhost,
)
from messaging.wire import task_message_build

T = TypeVar("T")

PUBLISH_CHUNK = 500  # task messages per confirm wait while building the backlog
BENCH_PREFIX = "bench-priority"


class BenchmarkError(Exception):
    """The benchmark could not run or finish; the message says why."""


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50: float
    p99: float
    max: float


@dataclass(frozen=True)
class PriorityResult:
    backlog: int
    vip: LatencySummary
    normal: LatencySummary
    backlog_at_vip_sends: tuple[int, int]  # (min, max) queue depth when a VIP task was sent
    drain_seconds: float  # from the worker's first delivery to the last


def benchmark_priority(
    *,
    backlog: int,
    vip_count: int,
    vip_interval: float,
    timeout: float,
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
) -> PriorityResult:
    """Build the backlog with the worker stopped, start it, send VIP tasks while it drains."""
    try:
        with scratch_vhost("bench_priority", broker_url=settings.CELERY_BROKER_URL) as url:
            return _measure_priority(
                url,
                backlog=backlog,
                vip_count=vip_count,
                vip_interval=vip_interval,
                timeout=timeout,
                progress=progress,
            )
    except ScratchVhostError as error:
        raise BenchmarkError(f"bench_priority works in a vhost of its own: {error}") from error


def _measure_priority(
    url: str,
    *,
    backlog: int,
    vip_count: int,
    vip_interval: float,
    timeout: float,
    progress: Callable[[str, int, int], None],
) -> PriorityResult:
    worker: ProcfileProcess | None = None
    message, target_id = _bench_message()
    try:
        publisher = EventPublisher(url)
        try:
            normal_ids = _publish(
                publisher, message, target_id, count=backlog, priority=PRIORITY_LOW, progress=progress
            )
            worker = _start_worker(url)
            _wait(lambda: _delivered(normal_ids) > 0, timeout=60, what="the notifier's first delivery")
            vip_ids, depths = [], []
            for n in range(vip_count):
                depths.append(_queue_depth(url))
                vip_ids += _publish(publisher, message, target_id, count=1, priority=PRIORITY_HIGH)
                progress("vip", n + 1, vip_count)
                time.sleep(vip_interval)
        finally:
            publisher.close()
        deadline = time.monotonic() + timeout
        while (done := _delivered(normal_ids) + _delivered(vip_ids)) < backlog + vip_count:
            if worker.poll() is not None:
                raise BenchmarkError(f"the notifier exited with {worker.returncode}")
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"only {done} of {backlog + vip_count} tasks delivered in {timeout:.0f}s"
                )
            progress("drain", done, backlog + vip_count)
            time.sleep(0.5)
        return PriorityResult(
            backlog=backlog,
            vip=_latencies(vip_ids),
            normal=_latencies(normal_ids),
            backlog_at_vip_sends=(min(depths), max(depths)),
            drain_seconds=_drain_seconds(normal_ids + vip_ids),
        )
    finally:
        if worker is not None:
            worker.stop(timeout=20)
        _with_db_retry(_delete_bench_data)


def _delete_bench_data() -> None:
    Room.objects.filter(slug__startswith=BENCH_PREFIX).delete()  # with its messages and their ledger rows
    get_user_model().objects.filter(username__startswith=BENCH_PREFIX).delete()


def _bench_message() -> tuple[Message, int]:
    """A message by a bench author mentioning a bench user who has no socket (so: email)."""
    users = get_user_model().objects
    suffix = uuid.uuid4().hex[:6]
    author = users.create_user(f"{BENCH_PREFIX}-author-{suffix}")
    target = users.create_user(f"{BENCH_PREFIX}-target-{suffix}", email="bench@example.invalid")
    room = Room.objects.create(slug=f"{BENCH_PREFIX}-{suffix}", name="Priority benchmark")
    message = Message.objects.create(
        room=room, author=author, text=f"@{target.username} ping", client_id=uuid.uuid4(), seq=1
    )
    return message, target.pk


def _publish(
    publisher: EventPublisher,
    message: Message,
    target_id: int,
    *,
    count: int,
    priority: int,
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    for start in range(0, count, PUBLISH_CHUNK):
        batch = []
        for _ in range(min(PUBLISH_CHUNK, count - start)):
            event_id = uuid.uuid4()
            queued_at = timezone.now()
            event = event_envelope(
                routing_key=MENTION.routing_key,
                event_id=event_id,
                fields=mention_fields(
                    user_id=target_id,
                    message_id=message.pk,
                    room_id=message.room_id,
                    author_id=message.author_id,
                    priority=priority,
                    queued_at=queued_at,
                    expires_at=queued_at + timedelta(hours=1),
                ),
            )
            batch.append(task_message_build(routing_key=MENTION.routing_key, rows=[(0, event, priority)]))
            ids.append(event_id)
        if len(publisher.publish(batch)) != len(batch):
            raise BenchmarkError("the broker did not confirm every benchmark task")
        progress("backlog", len(ids), count)
    return ids


def _start_worker(url: str) -> ProcfileProcess:
    """The Procfile's notifier on the benchmark's vhost, once it consumes the notifications queue."""
    env = {
        **child_process_env(),
        "CELERY_BROKER_URL": url,
        "EMAIL_URL": "memorymail://",
        "LOG_LEVEL": "WARNING",
    }
    queue = notifications_queue(queue_type=settings.NOTIFICATIONS_QUEUE_TYPE).name
    worker = ProcfileProcess(
        procfile_argv("notifier", "--without-mingle --without-gossip --loglevel WARNING"),
        env=env,
        ready=lambda: queue_consumers(url, queue) > 0,  # the vhost is the benchmark's own
    )
    try:
        worker.start()
    except ProcessNotReady as error:
        worker.kill()  # when it is alive but not consuming
        raise BenchmarkError(f"the notifier did not start: {error}") from None
    return worker


def _queue_depth(url: str) -> int:
    with Connection(url) as connection:
        queue = notifications_queue(queue_type=settings.NOTIFICATIONS_QUEUE_TYPE)
        return queue.bind(connection.default_channel).queue_declare(passive=True).message_count


def _delivered(ids: list[uuid.UUID]) -> int:
    return _with_db_retry(lambda: NotificationDelivery.objects.filter(notification_id__in=ids).count())


def _with_db_retry(query: Callable[[], T], attempts: int = 60) -> T:
    """Run a read again after a lost database connection (a restart elsewhere on a shared machine)."""
    for _ in range(attempts - 1):
        try:
            return query()
        except (OperationalError, InterfaceError):
            db_connection.close()
            time.sleep(1.0)
    return query()


def _latencies(ids: list[uuid.UUID]) -> LatencySummary:
    rows = NotificationDelivery.objects.filter(notification_id__in=ids).values_list(
        "queued_at", "delivered_at"
    )
    seconds = sorted((delivered - queued).total_seconds() for queued, delivered in rows)
    if len(seconds) < 2:
        raise BenchmarkError("too few deliveries to compute percentiles")
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return LatencySummary(count=len(seconds), p50=cuts[49], p99=cuts[98], max=seconds[-1])


def _drain_seconds(ids: list[uuid.UUID]) -> float:
    times = NotificationDelivery.objects.filter(notification_id__in=ids).values_list(
        "delivered_at", flat=True
    )
    return (max(times) - min(times)).total_seconds()


def _wait(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    try:
        wait_until(condition, timeout=timeout, message=f"gave up waiting for {what}")
    except TimeoutError as error:
        raise BenchmarkError(str(error)) from None
