"""The analytics lag benchmark behind `manage.py bench_analytics_lag` (docs/performance.md).

Stores chat messages through chat.services.message_create at a fixed rate from several threads,
with the relay and analytics workers running, then measures for each message the time from
stored (the message's created_at, carried in its event) to counted (the ledger's processed_at).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from amqp.exceptions import PreconditionFailed
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, connections
from django.utils import timezone
from kombu import Connection

from analytics.models import ProcessedEvent
from analytics.selectors import LagStats, processing_lag
from bench.procfile import (
    Probe,
    ProcessNotReady,
    ProcfileProcess,
    child_process_env,
    outbox_listeners,
    procfile_argv,
    queue_consumers,
)
from chat.models import Room
from chat.services import message_create
from messaging.events import MESSAGE_CREATED, message_created_payload
from messaging.models import OutboxEvent
from messaging.topology import ANALYTICS_QUEUE, declare_topology

BENCH_PREFIX = "bench-lag-"
READY_TIMEOUT_SECONDS = 60.0


class BenchError(Exception):
    """The benchmark could not run or finish; the message says why, in one line."""


@dataclass(frozen=True)
class SendResult:
    message_ids: list[int]
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.message_ids) / self.seconds if self.seconds else 0.0


@contextmanager
def pipeline_processes(*, workers: int, log_dir: Path | None = None) -> Iterator[Path]:
    """Run the Procfile's `relay` and `workers` x `worker` on this process's database and broker,
    whose topology is declared first (as `setup_broker` does; BenchError when it differs).

    Each is started once a probe sees it serve (a worker: one more consumer on the analytics queue;
    the relay: its LISTEN); all are stopped (SIGTERM) on exit. Yields the log directory.
    """
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-analytics-"))
    broker_url = settings.CELERY_BROKER_URL
    # This process's broker and queue type (a test's overrides too): on a cluster, its quorum queues.
    env = {
        **child_process_env(),
        "CELERY_BROKER_URL": broker_url,
        "BROKER_QUEUE_TYPE": settings.BROKER_QUEUE_TYPE,
    }
    children: list[ProcfileProcess] = []

    def start(name: str, argv: list[str], ready: Probe) -> None:
        log_path = log_dir / f"{name}.log"
        child = ProcfileProcess(argv, env=env, log_path=log_path, ready=ready)
        children.append(child)
        try:
            child.start(timeout=READY_TIMEOUT_SECONDS)
        except ProcessNotReady:
            if child.poll() is not None:
                raise BenchError(f"{name} exited with {child.returncode}; see {log_path}") from None
            raise BenchError(
                f"{name} was not ready within {READY_TIMEOUT_SECONDS:.0f}s; see {log_path}"
            ) from None

    try:
        # What `make run`'s setup_broker does before its workers start: on quorum queues a Celery
        # worker binds each of its app's queues to Celery's delayed-delivery exchange (countdown
        # retries), and a queue not declared yet fails that.
        _topology_declare(broker_url)
        # Consumers and listeners already there (`make run`'s) are counted before ours start.
        consumers = queue_consumers(broker_url, ANALYTICS_QUEUE.name)
        for i in range(workers):
            name = f"bench-worker-{i}-{uuid.uuid4().hex[:6]}"
            start(
                name,
                procfile_argv(
                    "worker",
                    f"--hostname {name}@%h --without-mingle --without-gossip "
                    "--metrics-port 0",  # the Procfile's port may be taken by `make run`
                ),
                ready=lambda expected=consumers + i + 1: (
                    queue_consumers(broker_url, ANALYTICS_QUEUE.name) >= expected
                ),
            )
        listeners = outbox_listeners()
        start("relay", procfile_argv("relay"), ready=lambda: outbox_listeners() > listeners)
        yield log_dir
    finally:
        for child in children:
            child.stop()


def _topology_declare(broker_url: str) -> None:
    with Connection(broker_url) as connection:
        try:
            declare_topology(connection)
        except PreconditionFailed as error:
            raise BenchError(
                f"the broker's queues differ from messaging/topology.py's ({error.reply_text}); "
                "run `manage.py setup_broker --check`"
            ) from None


def bench_rooms_and_users(*, rooms: int, users: int) -> tuple[list[Room], list]:
    """The benchmark's public rooms and users, created on first use (names start with bench-lag-)."""
    user_model = get_user_model()
    bench_users = [
        user_model.objects.get_or_create(username=f"{BENCH_PREFIX}user-{i}")[0] for i in range(users)
    ]
    bench_rooms = [
        Room.objects.get_or_create(slug=f"{BENCH_PREFIX}room-{i}", defaults={"name": f"Bench lag {i}"})[0]
        for i in range(rooms)
    ]
    return bench_rooms, bench_users


def messages_send_at_rate(
    *,
    rate: float,
    count: int,
    threads: int,
    rooms: list[Room],
    users: list,
    on_sent: Callable[[int], None] = lambda n: None,
) -> SendResult:
    """Store `count` messages, the n-th at n/rate seconds from the start (open loop: a late
    thread does not slow the schedule down, it catches up)."""
    total = count
    ids: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = time.monotonic() + 0.2

    def run(index: int) -> None:
        try:
            for n in range(index, total, threads):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                result = message_create(
                    room=rooms[n % len(rooms)],
                    author=users[n % len(users)],
                    text=f"bench message {n}",
                    client_id=uuid.uuid4(),
                )
                ids[index].append(result.message.id)
                on_sent(1)
        except BaseException as error:  # reported by the caller; a thread must not die silently
            errors.append(error)
        finally:
            connection.close()

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - start
    if errors:
        raise BenchError(f"storing messages failed: {errors[0]!r}")
    return SendResult(message_ids=[i for chunk in ids for i in chunk], seconds=elapsed)


def messages_send_from_processes(
    *,
    rate: float,
    seconds: float,
    processes: int,
    threads: int,
    rooms: list[Room],
    users: list,
    on_progress: Callable[[int], None] = lambda n: None,
) -> SendResult:
    """Like messages_send_at_rate, split over `processes` forked processes of `threads` threads each.

    One Python process cannot store more than about a hundred messages a second through
    message_create (the GIL); the rate asked for is what all processes send together.
    """
    total = int(rate * seconds)
    if processes == 1:
        return messages_send_at_rate(
            rate=rate, count=total, threads=threads, rooms=rooms, users=users, on_sent=on_progress
        )
    context = multiprocessing.get_context("fork")
    sent = context.Value("i", 0)
    results = context.Queue()
    connections.close_all()  # a forked child must not share this process's database sockets

    def child(index: int) -> None:
        def count(n: int) -> None:
            with sent.get_lock():
                sent.value += n

        try:
            # Each process takes every processes-th room and user, so they do not contend on rows.
            result = messages_send_at_rate(
                rate=rate / processes,
                count=total // processes + (index < total % processes),
                threads=threads,
                rooms=rooms[index::processes] or rooms,
                users=users[index::processes] or users,
                on_sent=count,
            )
            results.put(("ok", result.message_ids, result.seconds))
        except BaseException as error:
            results.put(("error", repr(error), 0.0))

    children = [context.Process(target=child, args=(i,), daemon=True) for i in range(processes)]
    for process in children:
        process.start()
    outcomes = []
    while len(outcomes) < processes:
        on_progress(sent.value)
        try:
            outcomes.append(results.get(timeout=0.25))
        except Exception:  # queue.Empty: nothing finished yet
            continue
    on_progress(sent.value)
    for process in children:
        process.join()
    failures = [detail for status, detail, _ in outcomes if status == "error"]
    if failures:
        raise BenchError(f"storing messages failed: {failures[0]}")
    return SendResult(
        message_ids=[i for _, ids, _ in outcomes for i in ids],
        seconds=max(elapsed for _, _, elapsed in outcomes),
    )


# Synthetic message ids for --burst events: far above any real id, so they never meet one.
BURST_MESSAGE_ID_BASE = 10**15


def burst_events_store(*, count: int, rooms: list[Room], users: list, chunk: int = 500) -> list[int]:
    """Write `count` chat.message.created outbox events at once, as fast as PostgreSQL takes them.

    Measures the relay and workers alone, without the cost of storing real messages: the events
    name synthetic message ids. Each chunk commits (and NOTIFYs the relay) on its own, with the
    chunk's start as the events' created_at. Returns the synthetic message ids.
    """
    ids = _synthetic_message_ids(count)
    for start in range(0, count, chunk):
        _events_write(ids[start : start + chunk], first_seq=start + 1, rooms=rooms, users=users)
    return ids


def events_store_at_rate(*, rate: float, seconds: float, rooms: list[Room], users: list) -> SendResult:
    """Write synthetic chat.message.created events at `rate` per second for `seconds`, paced.

    The steady-load twin of burst_events_store: a chunk every 100 ms, each event's created_at
    its chunk's commit time, so the lag measured is the pipeline's at that rate without the
    CPU that generating real chat messages takes from it on a small machine.
    """
    tick = 0.1
    ids = _synthetic_message_ids(int(rate * seconds))
    per_tick = max(1, round(rate * tick))
    started = time.monotonic()
    for n, start in enumerate(range(0, len(ids), per_tick)):
        delay = started + n * tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        _events_write(ids[start : start + per_tick], first_seq=start + 1, rooms=rooms, users=users)
    return SendResult(message_ids=ids, seconds=time.monotonic() - started)


def _synthetic_message_ids(count: int) -> list[int]:
    base = BURST_MESSAGE_ID_BASE + int(time.time() * 1000) * 100_000
    return list(range(base, base + count))


def _events_write(message_ids: list[int], *, first_seq: int, rooms: list[Room], users: list) -> None:
    now = timezone.now()
    rows = []
    for offset, message_id in enumerate(message_ids):
        n = first_seq - 1 + offset
        event_id = uuid.uuid4()
        room = rooms[n % len(rooms)]
        rows.append(
            OutboxEvent(
                event_id=event_id,
                routing_key=MESSAGE_CREATED.routing_key,
                payload=message_created_payload(
                    event_id=event_id,
                    room_id=room.pk,
                    room=room.slug,
                    author_id=users[n % len(users)].pk,
                    message_id=message_id,
                    seq=n + 1,
                    created_at=now,
                ),
            )
        )
    OutboxEvent.objects.bulk_create(rows)  # its own transaction; the outbox trigger NOTIFYs the relay


def counted_of(message_ids: list[int]) -> int:
    return ProcessedEvent.objects.filter(message_id__in=message_ids).count()


def wait_until_counted(
    *, message_ids: list[int], timeout: float, on_progress: Callable[[int], None] = lambda n: None
) -> int:
    """Wait until every message is counted or `timeout` passes; returns how many are counted."""
    deadline = time.monotonic() + timeout
    while True:
        counted = counted_of(message_ids)
        on_progress(counted)
        if counted >= len(message_ids) or time.monotonic() > deadline:
            return counted
        time.sleep(0.25)


def lag_of(message_ids: list[int]) -> LagStats:
    return processing_lag(message_ids=message_ids)
