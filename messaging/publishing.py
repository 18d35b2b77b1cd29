"""Publishing pending outbox rows with publisher confirms, and marking them sent only once confirmed.

Rows are locked with `FOR UPDATE SKIP LOCKED` (several relays may run), published as persistent
task messages (messaging/wire.py) with pipelined confirms, and marked sent in the transaction that
holds their locks only after RabbitMQ confirmed every one of them. A crash anywhere before that
commit leaves the rows pending, so they are published again: delivery is at-least-once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqp.exceptions import PreconditionFailed
from django.conf import settings
from django.db import transaction
from django.db.models import TextField
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.utils import timezone
from kombu import Connection

from infrastructure.faults import fault_point
from infrastructure.health import first_line
from messaging.confirms import ConfirmingPublisher, Outgoing
from messaging.events import EVENT_TASKS
from messaging.metrics import RELAY_PUBLISH_SECONDS
from messaging.models import OutboxEvent
from messaging.topology import CHAT_EVENTS_EXCHANGE, declare_topology
from messaging.wire import TaskMessage, task_message_from_json

logger = logging.getLogger(__name__)

# How many rows one transaction locks: several task messages, published before one confirm wait.
BATCHES_PER_ROUND = 10


@dataclass(frozen=True)
class PublishResult:
    selected: int  # pending rows this round locked
    sent: int  # rows confirmed by the broker and marked sent
    messages: int  # task messages published

    @property
    def failed(self) -> int:
        return self.selected - self.sent


class EventPublisher:
    """Task messages to the chat_events exchange, each counted only once RabbitMQ confirmed it."""

    def __init__(self, broker_url: str | None = None, *, declare: bool = True, heartbeat: int = 0) -> None:
        self.broker_url = broker_url or settings.CELERY_BROKER_URL
        self._confirming = ConfirmingPublisher(
            self.broker_url,
            # The relay sets the Celery task id as correlation_id (as_task_v2 does).
            return_key=lambda message: message.properties.get("correlation_id", ""),
            on_connect=_declare_topology if declare else None,
            # Only the relay asks for heartbeats: it is the one that drives them (events_wait).
            heartbeat=heartbeat,
        )

    @property
    def connected(self) -> bool:
        return self._confirming.connected

    @property
    def keep_alive_seconds(self) -> float | None:
        return self._confirming.keep_alive_seconds

    @property
    def node(self) -> str:
        return self._confirming.node

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


def publish_pending_events(
    *,
    publisher: EventPublisher,
    batch_size: int | None = None,
    batches_per_round: int = BATCHES_PER_ROUND,
) -> PublishResult:
    """Publish one round of pending outbox events and mark the confirmed ones sent.

    Locks up to batch_size * batches_per_round pending rows (skipping rows another relay holds),
    publishes them as task messages of up to batch_size events sharing a routing key, waits for
    all confirms, then marks the confirmed rows sent in the same transaction. Raises
    BrokerUnavailable (nothing marked) when the broker is unreachable.
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
            .values_list("id", "routing_key", "payload_json", "expires_at")[: batch_size * batches_per_round]
        )
        if not rows:
            return PublishResult(selected=0, sent=0, messages=0)
        # Events share a message only with the same routing key (so a VIP's mention never rides in
        # a normal batch: the key picks the queue) and expiry (a message has one TTL).
        by_key: dict[tuple[str, str | None], list[tuple[int, str]]] = {}
        for row_id, routing_key, payload_json, expires_at in rows:
            by_key.setdefault((routing_key, expires_at), []).append((row_id, payload_json))
        messages = [
            task_message_from_json(
                routing_key=routing_key,
                row_ids=[row_id for row_id, _ in chunk],
                events_json=[payload_json for _, payload_json in chunk],
                expiries=[expires_at] if expires_at else [],
            )
            for (routing_key, expires_at), key_rows in by_key.items()
            for start in range(0, len(key_rows), batch_size)
            if (chunk := key_rows[start : start + batch_size])
        ]
        with RELAY_PUBLISH_SECONDS.time():
            confirmed = publisher.publish(messages)
        # Confirmed, not yet marked sent: a crash here publishes these rows a second time.
        fault_point("relay.after_confirm")
        sent_ids = [row_id for message in confirmed for row_id in message.event_ids]
        if sent_ids:
            OutboxEvent.objects.filter(id__in=sent_ids).update(sent_at=timezone.now())
    return PublishResult(selected=len(rows), sent=len(sent_ids), messages=len(messages))
