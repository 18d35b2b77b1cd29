"""The outbox relay: moves committed outbox rows to RabbitMQ without losing any.

Rows are locked with `FOR UPDATE SKIP LOCKED` (several relays may run), published as persistent
Celery task messages with pipelined publisher confirms, and marked sent in the transaction that
holds their locks only after RabbitMQ confirmed every one of them. A crash anywhere before that
commit leaves the rows pending, so they are published again: delivery is at-least-once, and the
consumers are idempotent on `event_id`.

While idle the relay keeps its broker connection alive with AMQP heartbeats (`events_wait`), so a
connection that died silently is replaced before the next event needs it. Events whose routing key
no task consumes are never published and never dropped: the relay names them in its log.

`manage.py run_relay` runs `relay_run`; `publish_pending_events` and `prune_sent_events` are the
services it calls, usable directly from tests and `manage.py bench_publish`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import amqp
import psycopg2
import psycopg2.extensions
from amqp.exceptions import PreconditionFailed
from celery import current_app
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db import connection as django_connection
from django.db.models import Count, TextField
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.utils import timezone
from kombu import Connection

from infrastructure.health import first_line, redacted_url
from infrastructure.postgres import database_connect_autocommit, delete_in_chunks
from messaging.confirms import ConfirmingPublisher, Outgoing
from messaging.connection import BrokerUnavailable
from messaging.events import EVENT_TASKS
from messaging.metrics import RELAY_PUBLISH_SECONDS
from messaging.models import OutboxEvent
from messaging.outbox import OUTBOX_NOTIFY_CHANNEL
from messaging.topology import CHAT_EVENTS_EXCHANGE, declare_topology

logger = logging.getLogger(__name__)

# Exit status of a relay stopped by the crash test hook, distinct from any real failure.
CRASH_HOOK_EXIT_CODE = 75
# How many rows one transaction locks: several task messages, published before one confirm wait.
BATCHES_PER_ROUND = 10
MAX_BACKOFF_SECONDS = 30.0
PRUNE_EVERY_SECONDS = 3600.0
# How often the caught-up relay looks for pending events no task consumes (a cheap read then).
UNROUTABLE_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class PublishResult:
    selected: int  # pending rows this round locked
    sent: int  # rows confirmed by the broker and marked sent
    messages: int  # task messages published

    @property
    def failed(self) -> int:
        return self.selected - self.sent


@dataclass(frozen=True)
class TaskMessage:
    event_ids: list[int]  # outbox row ids carried by this message
    routing_key: str
    task_id: str
    message: amqp.Message


class EventPublisher:
    """Task messages to the chat_events exchange, each counted only once RabbitMQ confirmed it."""

    def __init__(self, broker_url: str | None = None, *, declare: bool = True, heartbeat: int = 0) -> None:
        self.broker_url = broker_url or settings.CELERY_BROKER_URL
        self._confirming = ConfirmingPublisher(
            self.broker_url,
            # The relay sets the Celery task id as correlation_id (as_task_v2 does).
            return_key=lambda message: message.properties.get("correlation_id", ""),
            on_connect=_declare_topology if declare else None,
            # Only relay_run asks for heartbeats: it is the one that drives them (events_wait).
            heartbeat=heartbeat,
        )

    @property
    def connected(self) -> bool:
        return self._confirming.connected

    @property
    def keep_alive_seconds(self) -> float | None:
        return self._confirming.keep_alive_seconds

    def fileno(self) -> int:
        return self._confirming.fileno()

    def keep_alive(self) -> None:
        """Read what the broker sent and send a heartbeat when due; raises BrokerUnavailable."""
        self._confirming.keep_alive()

    def connect(self) -> None:
        """Open the connection and a confirm-mode channel; raises BrokerUnavailable."""
        self._confirming.connect()

    def close(self) -> None:
        self._confirming.close()

    def publish(self, messages: list[TaskMessage]) -> list[TaskMessage]:
        """Publish every message with pipelined confirms; returns the confirmed-and-routed ones.

        A nacked or unroutable message is left out (its rows stay pending). Raises
        BrokerUnavailable when the broker is unreachable or the confirms do not come.
        """
        failed = self._confirming.publish(
            [Outgoing(m.task_id, m.message, CHAT_EVENTS_EXCHANGE.name, m.routing_key) for m in messages]
        )
        return [message for message in messages if message.task_id not in failed]


def _declare_topology(connection: Connection) -> None:
    # Publishing into a missing exchange would close the channel, so a relay started before
    # setup_broker declares it. A mismatch is setup_broker's to report; publishing goes on.
    try:
        declare_topology(connection)
    except PreconditionFailed as error:
        logger.error(
            "the broker's topology differs from messaging/topology.py (%s); "
            "run `manage.py setup_broker --check`",
            first_line(error),
        )


def task_message_build(*, routing_key: str, rows: list[tuple[int, dict[str, Any], int]]) -> TaskMessage:
    """One Celery protocol-2 message for EVENT_TASKS[routing_key] with args `[events]`.

    Built with Celery's own `as_task_v2`, so a stock worker consumes it; `rows` are
    (outbox id, payload, priority) in id order.
    """
    return _task_message(
        routing_key=routing_key,
        row_ids=[row_id for row_id, _, _ in rows],
        events_json=[json.dumps(payload, separators=(",", ":")) for _, payload, _ in rows],
        priority=max(priority for _, _, priority in rows),
        expiries=[payload["expires_at"] for _, payload, _ in rows if payload.get("expires_at")],
    )


def _task_message(
    *, routing_key: str, row_ids: list[int], events_json: list[str], priority: int, expiries: list[str]
) -> TaskMessage:
    task_id = str(uuid.uuid4())
    headers, properties, body, _ = current_app.amqp.as_task_v2(
        task_id,
        EVENT_TASKS[routing_key],
        args=[[]],  # the events are spliced into the body below
        # Celery's default repr of hundreds of events costs more than the publish itself.
        argsrepr=f"[<{len(events_json)} {routing_key} events>]",
        kwargsrepr="{}",
        ignore_result=True,
    )
    _, kwargs, embed = body
    # Body (args, kwargs, embed) with args = [events]. Each event goes in as the JSON text it
    # already is: decoding and re-encoding every payload took a third of the relay's time.
    body_json = "".join(
        (
            "[[[",
            ",".join(events_json),
            "]],",
            json.dumps(kwargs),
            ",",
            json.dumps(embed, separators=(",", ":")),
            "]",
        )
    )
    expiration = _expiration_ms(expiries)
    if expiration is not None:
        # Per-message TTL: RabbitMQ dead-letters it (reason "expired") rather than deliver it late.
        properties["expiration"] = expiration
    message = amqp.Message(
        body_json,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,  # persistent: survives a broker restart once confirmed
        # publish_pending_events never mixes priorities in one message: one priority per message.
        priority=priority,
        application_headers=headers,
        **properties,
    )
    return TaskMessage(row_ids, routing_key, task_id, message)


def _expiration_ms(expiries: list[str]) -> str | None:
    """The AMQP `expiration` (milliseconds from now, as text) of events carrying `expires_at`.

    Events sharing a message share one `expires_at` (see publish_pending_events); one already
    past gets "0", which RabbitMQ dead-letters at once unless a consumer is waiting.
    """
    if not expiries:
        return None
    earliest = min(datetime.fromisoformat(expiry) for expiry in expiries)
    return str(max(0, int((earliest - timezone.now()).total_seconds() * 1000)))


def publish_pending_events(
    *,
    publisher: EventPublisher,
    batch_size: int | None = None,
    batches_per_round: int = BATCHES_PER_ROUND,
    before_commit: Callable[[], None] | None = None,
) -> PublishResult:
    """Publish one round of pending outbox events and mark the confirmed ones sent.

    Locks up to batch_size * batches_per_round pending rows (skipping rows another relay holds),
    publishes them as task messages of up to batch_size events sharing a routing key, waits for
    all confirms, then marks the confirmed rows sent in the same transaction. Raises
    BrokerUnavailable (nothing marked) when the broker is unreachable. `before_commit` runs after
    the confirms and before the commit (the crash test hook).
    """
    batch_size = batch_size or settings.OUTBOX_BATCH_SIZE
    with transaction.atomic():
        rows = list(
            OutboxEvent.objects.select_for_update(skip_locked=True)
            # Rows no task consumes are left pending for someone to look at, not published.
            .filter(sent_at__isnull=True, routing_key__in=list(EVENT_TASKS))
            .order_by("id")
            # The payload as PostgreSQL's JSON text: it goes into the message body undecoded.
            .annotate(payload_json=Cast("payload", TextField()), expires_at=KT("payload__expires_at"))
            .values_list("id", "routing_key", "payload_json", "priority", "expires_at")[
                : batch_size * batches_per_round
            ]
        )
        if not rows:
            return PublishResult(selected=0, sent=0, messages=0)
        # Events share a message only with the same routing key, priority and expiry: a message
        # has one AMQP priority and one TTL, and a VIP's event must not ride in a normal batch.
        by_key: dict[tuple[str, int, str | None], list[tuple[int, str]]] = {}
        for row_id, routing_key, payload_json, priority, expires_at in rows:
            by_key.setdefault((routing_key, priority, expires_at), []).append((row_id, payload_json))
        messages = [
            _task_message(
                routing_key=routing_key,
                row_ids=[row_id for row_id, _ in chunk],
                events_json=[payload_json for _, payload_json in chunk],
                priority=priority,
                expiries=[expires_at] if expires_at else [],
            )
            for (routing_key, priority, expires_at), key_rows in by_key.items()
            for start in range(0, len(key_rows), batch_size)
            if (chunk := key_rows[start : start + batch_size])
        ]
        with RELAY_PUBLISH_SECONDS.time():
            confirmed = publisher.publish(messages)
        if before_commit is not None:
            before_commit()
        sent_ids = [row_id for message in confirmed for row_id in message.event_ids]
        if sent_ids:
            OutboxEvent.objects.filter(id__in=sent_ids).update(sent_at=timezone.now())
    return PublishResult(selected=len(rows), sent=len(sent_ids), messages=len(messages))


def unroutable_pending_events() -> dict[str, int]:
    """Pending events by routing key, for the keys no task in EVENT_TASKS consumes.

    publish_pending_events never selects them, so they wait forever (kept: nothing is lost) and
    `chat_outbox_oldest_pending_age_seconds` grows; this names them. Reads only pending rows
    (the partial index): relay_run calls it once caught up, when little else is pending.
    """
    return dict(
        OutboxEvent.objects.filter(sent_at__isnull=True)
        .exclude(routing_key__in=list(EVENT_TASKS))
        .values("routing_key")
        .annotate(pending=Count("id"))
        .order_by()
        .values_list("routing_key", "pending")
    )


def crash_before_commit() -> None:
    """Test hook: die like a SIGKILL right after the broker confirmed and before the commit."""
    logging.shutdown()
    os._exit(CRASH_HOOK_EXIT_CODE)


def prune_sent_events(
    *, older_than: timedelta | None = None, between_chunks: Callable[[], None] | None = None
) -> int:
    """Delete events sent longer ago than the retention period; pending events are never touched."""
    if older_than is None:
        older_than = timedelta(days=settings.OUTBOX_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    return delete_in_chunks(
        OutboxEvent.objects.filter(sent_at__lt=cutoff).order_by("sent_at"), between_chunks=between_chunks
    )


class OutboxListener:
    """A LISTEN on the outbox channel, on its own autocommit psycopg2 connection."""

    def __init__(self) -> None:
        self._connection: psycopg2.extensions.connection | None = None

    def connect(self) -> None:
        if self._connection is not None and not self._connection.closed:
            return
        conn = database_connect_autocommit()
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {OUTBOX_NOTIFY_CHANNEL}")
        self._connection = conn

    def fileno(self) -> int:
        """The database socket, for select(): readable when a NOTIFY (or an error) arrived."""
        assert self._connection is not None
        return self._connection.fileno()

    def notified(self) -> bool:
        """Read what PostgreSQL sent; True when it held a NOTIFY. Raises psycopg2.Error."""
        assert self._connection is not None
        self._connection.poll()
        notified = bool(self._connection.notifies)
        self._connection.notifies.clear()
        return notified

    def wait(self, timeout: float) -> bool:
        """Block until a NOTIFY arrives or `timeout` passes; True when notified."""
        self.connect()
        readable, _, _ = select.select([self], [], [], timeout)
        return bool(readable) and self.notified()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None


def events_wait(*, seconds: float, listener: OutboxListener, publisher: EventPublisher) -> bool:
    """The idle relay's sleep: until a NOTIFY or `seconds` pass, keeping the broker connection alive.

    Wakes at least every `publisher.keep_alive_seconds` for its heartbeats, and whenever the broker
    sends something, so a dead or closed broker connection is noticed while idle. Returns True
    when notified; raises BrokerUnavailable (connection closed) or psycopg2.Error.
    """
    listener.connect()
    deadline = time.monotonic() + seconds
    while True:
        publisher.keep_alive()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        watched: list[OutboxListener | EventPublisher] = [listener]
        if publisher.connected:
            watched.append(publisher)
        tick = publisher.keep_alive_seconds
        readable, _, _ = select.select(watched, [], [], min(remaining, tick) if tick else remaining)
        if listener in readable and listener.notified():
            return True


class RelayLog:
    """Logs the relay's state changes only (connected, broker unreachable, reconnected), not events."""

    def __init__(self, broker_url: str) -> None:
        self.url = redacted_url(broker_url)
        self.broker = "starting"
        self.database = "up"
        self.unroutable_keys: set[str] = set()

    def broker_up(self) -> None:
        if self.broker == "starting":
            logger.info("relay connected to RabbitMQ at %s", self.url)
        elif self.broker == "down":
            logger.info("relay reconnected to RabbitMQ at %s; pending events flow again", self.url)
        self.broker = "up"

    def broker_down(self, error: str) -> None:
        if self.broker == "up":
            logger.warning(
                "lost the broker connection to %s (%s); events wait in the outbox, the relay reconnects",
                self.url,
                error,
            )
        elif self.broker == "starting":
            logger.warning(
                "broker unreachable at %s (%s); events wait in the outbox, the relay keeps retrying",
                self.url,
                error,
            )
        self.broker = "down"

    def database_up(self) -> None:
        if self.database == "down":
            logger.info("relay reconnected to the database")
        self.database = "up"

    def database_down(self, error: str) -> None:
        if self.database != "down":
            logger.warning("database unreachable (%s); the relay keeps retrying", error)
        self.database = "down"

    def unroutable(self, pending_by_key: dict[str, int]) -> None:
        """Report each routing key no task consumes once, when its events are first seen pending."""
        for routing_key in sorted(pending_by_key.keys() - self.unroutable_keys):
            logger.error(
                "%d outbox events with routing key %r stay pending: no task consumes it "
                "(EVENT_TASKS in messaging/events.py); they are kept, not published, until one does",
                pending_by_key[routing_key],
                routing_key,
            )
        for routing_key in sorted(self.unroutable_keys - pending_by_key.keys()):
            logger.info("no outbox events with routing key %r are pending any more", routing_key)
        self.unroutable_keys = set(pending_by_key)


def relay_run(
    *,
    broker_url: str | None = None,
    poll_seconds: float | None = None,
    crash_after_confirm: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """The relay loop: publish everything pending, then sleep until NOTIFY or the poll timeout.

    Survives broker and database outages (backoff, state-change logging); returns when
    `should_stop()` is true.
    """
    poll_seconds = poll_seconds if poll_seconds is not None else settings.OUTBOX_POLL_SECONDS
    publisher = EventPublisher(broker_url, heartbeat=settings.RELAY_HEARTBEAT_SECONDS)
    listener = OutboxListener()
    log = RelayLog(publisher.broker_url)
    before_commit = crash_before_commit if crash_after_confirm else None
    backoff = 0.5
    next_prune = next_unroutable_check = time.monotonic()
    try:
        while not should_stop():
            try:
                # LISTEN before reading, so an event committed in between still wakes us.
                listener.connect()
                publisher.connect()
                log.broker_up()
                result = PublishResult(selected=0, sent=0, messages=0)
                while not should_stop():
                    result = publish_pending_events(publisher=publisher, before_commit=before_commit)
                    log.database_up()
                    if result.failed or result.selected < settings.OUTBOX_BATCH_SIZE * BATCHES_PER_ROUND:
                        break
                if time.monotonic() >= next_prune:
                    # The broker hears from us between chunks: an hour of a busy chat is many.
                    pruned = prune_sent_events(between_chunks=publisher.keep_alive)
                    if pruned:
                        logger.info("pruned %d sent outbox events", pruned)
                    next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
                if time.monotonic() >= next_unroutable_check:
                    log.unroutable(unroutable_pending_events())
                    next_unroutable_check = time.monotonic() + UNROUTABLE_CHECK_SECONDS
                backoff = 0.5
                # Nacked or unroutable events are retried on the next poll, not in a hot loop.
                events_wait(
                    seconds=poll_seconds if not result.failed else min(poll_seconds, 1.0),
                    listener=listener,
                    publisher=publisher,
                )
            except BrokerUnavailable as error:
                log.broker_down(str(error))
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            except (DatabaseError, psycopg2.Error) as error:
                log.database_down(first_line(error))
                listener.close()
                django_connection.close()
                # Nothing would send its heartbeats during the backoff; it reopens with the database.
                publisher.close()
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
    finally:
        publisher.close()
        listener.close()
