"""`manage.py bench_publish`: the seed lesson's publish loop against the outbox relay's path.

Both run in a RabbitMQ vhost of the benchmark's own (deleted afterwards), so no real worker sees
the benchmark's messages. The outbox rows live in a copy of the outbox table in a PostgreSQL
schema of its own (dropped afterwards), so no real relay sees them either, and the relay's code
runs unchanged, commits included.
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

from messaging.events import MESSAGE_CREATED, MessageCreatedPayload, message_created_payload
from messaging.models import OutboxEvent
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.topology import QUEUES, ScratchVhostError, scratch_vhost

SEED_QUEUE = "bench_publish"


class BenchmarkError(Exception):
    """The benchmark could not run (no rabbitmqctl, broker down); the message says why."""


@dataclass(frozen=True)
class PublishTimings:
    count: int
    repeat: int  # runs of each path; the times are their medians
    seed_seconds: float  # pika, persistent, no confirms
    outbox_seconds: float  # outbox -> broker, persistent, confirmed
    outbox_messages: int  # task messages the events travelled in

    @property
    def ratio(self) -> float:
        return self.outbox_seconds / self.seed_seconds


def benchmark_publish(*, count: int, repeat: int = 3) -> PublishTimings:
    """Time both paths for `count` events in a fresh vhost, then delete it.

    The paths alternate `repeat` times and each reports its median, so that a burst of load
    from other processes on the machine does not decide the ratio.
    """
    _require_pika()
    try:
        with scratch_vhost("bench_publish", broker_url=settings.CELERY_BROKER_URL) as url:
            seed_runs, outbox_runs = [], []
            for _ in range(repeat):
                seed_runs.append(_time_seed_loop(url, count=count))
                seconds, messages = _time_outbox_path(url, count=count)
                outbox_runs.append(seconds)
                _purge_all(url)  # every run starts from empty queues
    except ScratchVhostError as error:
        raise BenchmarkError(f"bench_publish works in a vhost of its own: {error}") from error
    return PublishTimings(
        count, repeat, statistics.median(seed_runs), statistics.median(outbox_runs), messages
    )


def _require_pika() -> None:
    """The seed loop's client, pika, is a development requirement that production installs lack."""
    if importlib.util.find_spec("pika") is None:
        raise BenchmarkError(
            "bench_publish's baseline needs pika, a development requirement: "
            "pip install -r requirements-dev.txt"
        )


def _purge_all(url: str) -> None:
    with Connection(url) as conn:
        channel = conn.default_channel
        for queue in (SEED_QUEUE, *(q.name for q in QUEUES)):
            channel.queue_purge(queue)


def _time_seed_loop(url: str, *, count: int) -> float:
    """The seed lesson's loop: one persistent basic_publish per message, no confirms."""
    import pika  # only here: a development requirement (_require_pika)

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=SEED_QUEUE, durable=True)
        body = json.dumps(_payload(0)).encode()
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        started = time.perf_counter()
        for _ in range(count):
            channel.basic_publish(exchange="", routing_key=SEED_QUEUE, body=body, properties=properties)
        return time.perf_counter() - started
    finally:
        connection.close()


def _time_outbox_path(url: str, *, count: int) -> tuple[float, int]:
    """Insert `count` outbox rows (not timed), then time publish_pending_events until none pending.

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
        messages = 0
        started = time.perf_counter()
        while (result := publish_pending_events(publisher=publisher)).selected:
            messages += result.messages
        return time.perf_counter() - started, messages
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
