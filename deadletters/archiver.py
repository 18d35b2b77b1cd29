"""The dead-letter archiver loop (`manage.py run_dlq_archiver`): `dead_letters` -> PostgreSQL.

Manual acks: a batch of deliveries is acked only after `dead_letters_archive` committed its rows,
so a crash (SIGKILL included) at any point leaves them unacked and RabbitMQ redelivers them; the
rows stay `ack_pending` until RabbitMQ has handled the ack, and a redelivery takes over such a row
instead of adding one. A letter the database refuses does not hold back the others: it is stored
in minimal form, and one that cannot even be stored so is held unacked and handed back to RabbitMQ
after DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS. Survives broker and database outages by reconnecting
with backoff (messaging/loop.py); the unacked messages of a dropped connection come back by themselves.

While idle it keeps its broker connection alive with AMQP heartbeats (DLQ_ARCHIVER_HEARTBEAT_SECONDS),
so a broker gone without FIN or RST (a network partition) is noticed and the connection replaced,
without waiting on a close handshake that cannot come (messaging/connection.py).

Hourly (and once at start) it also prunes what the archive no longer needs: failure details no
dead letter claimed, and resolved dead letters past their retention.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable

import amqp
from django.conf import settings
from kombu import Connection

from deadletters.services.archive import (
    ArchiveOutcome,
    dead_letters_archive,
    dead_letters_mark_acked,
)
from deadletters.services.retention import dead_letters_prune, task_failures_prune
from infrastructure.faults import fault_point
from messaging.connection import (
    broker_close,
    broker_connect,
    broker_drop,
    broker_keep_alive,
    broker_node,
    keep_alive_interval,
)
from messaging.loop import BrokerLoop
from messaging.topology import DEAD_LETTER_QUEUE, declare_topology

logger = logging.getLogger(__name__)

# How long to wait for more deliveries once one arrived, to archive them in one transaction.
BATCH_GATHER_SECONDS = 0.02
# The idle archiver wakes at least this often (more often for short heartbeat intervals) to prune
# and to hand held letters back when due.
IDLE_WAKE_SECONDS = 1.0


class DeadLetterArchiver(BrokerLoop):
    """Consumes `dead_letters` with manual acks; every delivery is archived, then acked."""

    name = "dead-letter archiver"
    waiting = "dead letters wait in their queue"

    def __init__(
        self,
        *,
        broker_url: str | None = None,
        prefetch: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        heartbeat = settings.DLQ_ARCHIVER_HEARTBEAT_SECONDS
        super().__init__(
            broker_url=broker_url or settings.CELERY_BROKER_URL, heartbeat=heartbeat, should_stop=should_stop
        )
        self.prefetch = prefetch or settings.DLQ_ARCHIVER_PREFETCH
        self.idle_wake = min(IDLE_WAKE_SECONDS, keep_alive_interval(heartbeat) or IDLE_WAKE_SECONDS)
        self.connection: Connection | None = None
        self.channel: amqp.Channel | None = None
        self.arrived: list[amqp.Message] = []
        # Delivery tag -> when it was found unstorable; these stay unacked on this channel.
        self.held: dict[int, float] = {}

    def connect(self) -> None:
        self.connection = broker_connect(self.broker_url, heartbeat=self.heartbeat)
        declare_topology(self.connection)
        channel: amqp.Channel = self.connection.default_channel
        # Bounded prefetch: a crash redelivers at most this many, each archived once.
        channel.basic_qos(0, self.prefetch, False)
        # A new channel: whatever the previous one held unacked went back to the queue with it.
        self.arrived, self.held, self.channel = [], {}, channel
        channel.basic_consume(DEAD_LETTER_QUEUE.name, callback=self.arrived.append, no_ack=False)
        logger.info("dead-letter archiver consuming %s (prefetch %d)", DEAD_LETTER_QUEUE.name, self.prefetch)

    def broker_node(self) -> str:
        assert self.connection is not None
        return broker_node(self.connection)

    def work(self) -> bool:
        assert self.connection is not None and self.channel is not None
        _requeue_held_when_due(self.channel, self.held)
        if not self.arrived:
            return False
        # Whatever the broker has already pushed joins the batch: one commit for many.
        while len(self.arrived) < self.prefetch:
            try:
                self.connection.drain_events(timeout=BATCH_GATHER_SECONDS)
            except TimeoutError:
                break
        batch = self.arrived[:]
        self.arrived.clear()
        _archive_and_ack(self.channel, batch, held=self.held, prefetch=self.prefetch)
        return True

    def idle_wait(self) -> None:
        assert self.connection is not None
        # Deliveries can arrive while a batch is acked; those are archived without waiting.
        if not self.arrived:
            select.select([self.connection.connection.sock], [], [], self.idle_wake)
        # Reads what the broker sent (deliveries, heartbeats) and sends a heartbeat when due.
        self.keep_alive()

    def keep_alive(self) -> None:
        assert self.connection is not None
        broker_keep_alive(self.connection)

    def prune(self, *, between_chunks: Callable[[], None]) -> None:
        pruned = task_failures_prune(between_chunks=between_chunks)
        if pruned:
            logger.info("pruned %d task failures no dead letter claimed", pruned)
        pruned = dead_letters_prune(between_chunks=between_chunks)
        if pruned:
            logger.info("pruned %d resolved dead letters past DLQ_RESOLVED_RETENTION_DAYS", pruned)

    def close(self, *, broken: bool) -> None:
        # Closing hands the unacked deliveries back to RabbitMQ; a broken connection is only dropped.
        if self.connection is not None:
            (broker_drop if broken else broker_close)(self.connection)
        self.connection = self.channel = None


def dead_letter_archiver_run(
    *,
    broker_url: str | None = None,
    prefetch: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Consume `dead_letters` until `should_stop()` (or SIGTERM, with messaging.loop.stop_on_sigterm)."""
    DeadLetterArchiver(broker_url=broker_url, prefetch=prefetch, should_stop=should_stop).run()


def _archive_and_ack(
    channel: amqp.Channel, batch: list[amqp.Message], *, held: dict[int, float], prefetch: int
) -> None:
    if not batch:
        return
    deliveries = []
    for message in batch:
        properties = dict(message.properties)
        deliveries.append(
            {
                "body": message.body,
                "headers": properties.pop("application_headers", None) or {},
                "properties": properties,
                "exchange": message.delivery_info.get("exchange", ""),
                "routing_key": message.delivery_info.get("routing_key", ""),
                "redelivered": bool(message.delivery_info.get("redelivered")),
            }
        )
    results = dead_letters_archive(deliveries=deliveries)
    # Committed, not yet acked: the worst moment to die, as the archive must survive it.
    fault_point("archiver.after_commit")
    unstorable = [m for m, r in zip(batch, results, strict=True) if not r.stored]
    if held or unstorable:
        # A multiple ack would take the held deliveries with it.
        for message, result in zip(batch, results, strict=True):
            if result.stored:
                channel.basic_ack(message.delivery_tag)
    else:
        # Delivery tags grow on a channel and the batch holds every unacked one: ack them all at once.
        channel.basic_ack(batch[-1].delivery_tag, multiple=True)
    held.update(dict.fromkeys((m.delivery_tag for m in unstorable), time.monotonic()))
    # RabbitMQ answers basic.qos only after it handled the acks sent before it on this channel: from
    # then on these deliveries cannot come back, and no redelivery may take their rows over.
    channel.basic_qos(0, prefetch, False)
    dead_letters_mark_acked(dead_letters=[r.dead_letter for r in results if r.dead_letter is not None])
    for result in results:
        dl = result.dead_letter
        if result.outcome is ArchiveOutcome.ARCHIVED and dl is not None:
            logger.info(
                "archived dead letter #%d: %s from %s (%s)",
                dl.pk,
                dl.task_name or dl.routing_key,
                dl.origin_queue,
                dl.reason,
            )
    if unstorable:
        logger.error(
            "holding %d dead letters that could not be stored at all (%d held); they go back to the "
            "queue in %.0fs",
            len(unstorable),
            len(held),
            settings.DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS,
        )


def _requeue_held_when_due(channel: amqp.Channel, held: dict[int, float]) -> None:
    """Hand the deliveries held for DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS back to RabbitMQ: each is
    tried again once per that interval, never in a loop, and never dropped."""
    due_before = time.monotonic() - settings.DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS
    due = [tag for tag, since in held.items() if since <= due_before]
    for tag in due:
        channel.basic_reject(tag, requeue=True)
        del held[tag]
    if due:
        logger.warning("handed %d unstorable dead letters back to the queue to try them again", len(due))
