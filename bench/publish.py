"""`manage.py bench_publish`: the seed lesson's publish loop against the outbox relay's path.

The outbox path publishes to CELERY_BROKER_URL's broker, its queues as BROKER_QUEUE_TYPE wants
them (on a cluster: quorum, replicated), in a vhost of the benchmark's own (deleted afterwards),
so no real worker sees its messages. The seed loop publishes to `baseline_url`'s broker (by
default the same vhost; for a cluster, the single node it is compared with), into a durable
classic queue of its own that is deleted afterwards and bound to no exchange, so nothing else
sees its messages either. The outbox rows live in a copy of the outbox table in a PostgreSQL
schema of its own (dropped afterwards), so no real relay sees them, and the relay's code runs
unchanged, commits included.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection
from django.utils import timezone
from kombu import Connection
from kombu.utils.url import parse_url

from infrastructure.health import redacted_url
from messaging.events import MESSAGE_CREATED, MessageCreatedPayload, message_created_payload
from messaging.models import OutboxEvent
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.topology import QUEUES, ScratchVhostError, scratch_vhost

SEED_QUEUE_PREFIX = "bench_publish_seed"


class BenchmarkError(Exception):
    """The benchmark could not run (no rabbitmqctl, broker down); the message says why."""


@dataclass(frozen=True)
class PublishTimings:
    count: int
    repeat: int  # runs of each path; the times are their medians
    seed_seconds: float  # pika, persistent, no confirms
    outbox_seconds: float  # outbox -> broker, persistent, confirmed
    outbox_messages: int  # task messages the events travelled in (each run)
    outbox_confirmed: int  # events RabbitMQ confirmed, all runs together (count x repeat)
    outbox_queued: int  # task messages the work queues held after each run, all runs together
    seed_queued: int  # messages the seed's queue held after each run, all runs together
    seed_runs: tuple[float, ...]  # every run's time, in order, for the spread
    outbox_runs: tuple[float, ...]
    seed_broker: str  # where each path published (URLs without passwords)
    outbox_broker: str
    outbox_queue_type: str  # BROKER_QUEUE_TYPE: classic, or quorum (replicated) on a cluster

    @property
    def ratio(self) -> float:
        return self.outbox_seconds / self.seed_seconds


def benchmark_publish(*, count: int, repeat: int = 3, baseline_url: str | None = None) -> PublishTimings:
    """Time both paths for `count` events, the seed loop's on `baseline_url`'s broker (default:
    the outbox path's vhost), the outbox path's in a fresh vhost on CELERY_BROKER_URL's broker.

    The paths alternate `repeat` times and each reports its median, so that a burst of load
    from other processes on the machine does not decide the ratio.
    """
    _require_pika()
    try:
        with scratch_vhost("bench_publish", broker_url=settings.CELERY_BROKER_URL) as url:
            # One node: the seed's loop knew no failover (of a cluster's list, the first node).
            seed_url = (baseline_url or url).split(";")[0]
            seed_queue = f"{SEED_QUEUE_PREFIX}_{uuid.uuid4().hex[:8]}"
            seed_runs, outbox_runs = [], []
            confirmed = seed_queued = outbox_queued = 0
            try:
                for _ in range(repeat):
                    seed_runs.append(_time_seed_loop(seed_url, queue=seed_queue, count=count))
                    run = _time_outbox_path(url, count=count)
                    outbox_runs.append(run.seconds)
                    confirmed += run.confirmed
                    # Every run starts from empty queues; what they held shows that all arrived.
                    seed_queued += _purge(seed_url, [seed_queue])
                    outbox_queued += _purge(url, [q.name for q in QUEUES])
            finally:
                _delete_queue(seed_url, seed_queue)
    except ScratchVhostError as error:
        raise BenchmarkError(f"bench_publish works in a vhost of its own: {error}") from error
    return PublishTimings(
        count=count,
        repeat=repeat,
        seed_seconds=statistics.median(seed_runs),
        outbox_seconds=statistics.median(outbox_runs),
        outbox_messages=run.messages,
        outbox_confirmed=confirmed,
        outbox_queued=outbox_queued,
        seed_queued=seed_queued,
        seed_runs=tuple(seed_runs),
        outbox_runs=tuple(outbox_runs),
        seed_broker=redacted_url((baseline_url or settings.CELERY_BROKER_URL).split(";")[0]),
        outbox_broker=redacted_url(settings.CELERY_BROKER_URL),
        outbox_queue_type=settings.BROKER_QUEUE_TYPE,
    )


def _require_pika() -> None:
    """The seed loop's client, pika, is a development requirement that production installs lack."""
    if importlib.util.find_spec("pika") is None:
        raise BenchmarkError(
            "bench_publish's baseline needs pika, a development requirement: "
            "pip install -r requirements-dev.txt"
        )


def _purge(url: str, queues: list[str]) -> int:
    """Empty `queues`; returns how many messages they held."""
    with Connection(url) as conn:
        channel = conn.default_channel
        return sum(channel.queue_purge(queue) or 0 for queue in queues)


def _delete_queue(url: str, queue: str) -> None:
    with Connection(url) as conn:
        conn.default_channel.queue_delete(queue)


def _time_seed_loop(url: str, *, queue: str, count: int) -> float:
    """The seed lesson's loop: one persistent basic_publish per message, no confirms."""
    import pika  # only here: a development requirement (_require_pika)

    # Kombu's URL syntax (`//` is the vhost "/"), which pika's own parser reads differently.
    node = parse_url(url)
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            host=node["hostname"],
            port=node["port"],
            virtual_host=node["virtual_host"],
            credentials=pika.PlainCredentials(node["userid"], node["password"]),
        )
    )
    try:
        channel = connection.channel()
        # Classic whatever the vhost's default type: the seed's queue lived on one node.
        channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "classic"})
        body = json.dumps(_payload(0)).encode()
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        started = time.perf_counter()
        for _ in range(count):
            channel.basic_publish(exchange="", routing_key=queue, body=body, properties=properties)
        return time.perf_counter() - started
    finally:
        connection.close()


@dataclass(frozen=True)
class OutboxRun:
    seconds: float
    messages: int  # task messages published
    confirmed: int  # events in the messages RabbitMQ confirmed


def _time_outbox_path(url: str, *, count: int) -> OutboxRun:
    """Insert `count` outbox rows (not timed), then time publish_pending_events until none pending.

    Raises BenchmarkError when RabbitMQ refuses events (nack, unroutable): they stay pending and
    would be published again and again, and only confirmed events count as sent.

    The rows go into a copy of the outbox table (same columns and indexes) in a schema of the
    benchmark's own, put first on this connection's search_path: the relay's own queries and
    commits run unchanged, while real relays, which never look there, cannot see the rows, and
    real chat events cannot join the timed run.
    """
    table = OutboxEvent._meta.db_table
    schema = f"bench_publish_{uuid.uuid4().hex[:8]}"
    publisher = EventPublisher(url)
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        (home,) = cursor.fetchone()
        cursor.execute(f'CREATE SCHEMA "{schema}"')
        cursor.execute(f'CREATE TABLE "{schema}"."{table}" (LIKE "{home}"."{table}" INCLUDING ALL)')
        cursor.execute(f'SET search_path TO "{schema}", "{home}"')
    try:
        publisher.connect()
        now = timezone.now()
        OutboxEvent.objects.bulk_create(
            [
                OutboxEvent(
                    event_id=(event_id := uuid.uuid4()),
                    routing_key=MESSAGE_CREATED.routing_key,
                    payload=_payload(i, event_id=event_id),
                    created_at=now,
                )
                for i in range(count)
            ],
            batch_size=2000,
        )
        messages = confirmed = 0
        started = time.perf_counter()
        while (result := publish_pending_events(publisher=publisher)).selected:
            if result.failed:
                raise BenchmarkError(f"RabbitMQ refused {result.failed} of {result.selected} events")
            messages += result.messages
            confirmed += result.sent
        return OutboxRun(time.perf_counter() - started, messages, confirmed)
    finally:
        publisher.close()
        with connection.cursor() as cursor:
            cursor.execute("RESET search_path")
            cursor.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _payload(i: int, *, event_id: uuid.UUID | None = None) -> MessageCreatedPayload:
    # The shape and size of a real chat.message.created event (chat.services).
    return message_created_payload(
        event_id=event_id or uuid.uuid4(),
        room_id=1,
        room="general",
        author_id=1,
        message_id=1_000_000 + i,
        seq=i + 1,
        created_at=datetime(2026, 1, 1, 12, tzinfo=UTC),
    )
