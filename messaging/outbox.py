"""The transactional outbox's rows: written in their cause's transaction, pruned once sent.

messaging/relay.py moves them to RabbitMQ (messaging/publishing.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone

from infrastructure.postgres import delete_in_chunks
from messaging.events import EVENT_TASKS, event_envelope
from messaging.models import OutboxEvent

# The relay LISTENs on this channel. A trigger on the outbox table NOTIFYs it for every INSERT
# (migration chat 0004); PostgreSQL delivers a NOTIFY only when (and if) the transaction that
# issued it commits, and folds duplicates within one transaction.
OUTBOX_NOTIFY_CHANNEL = "chat_outbox"


def outbox_event_add(*, routing_key: str, payload: Mapping[str, Any]) -> OutboxEvent:
    """Queue an event for publication; must run inside the transaction of its cause.

    `payload` holds the event's own fields (from its builder in messaging.events); the stored
    payload adds the envelope (event_id, type).
    """
    [event] = outbox_events_add(routing_key=routing_key, payloads=[payload])
    return event


def outbox_events_add(*, routing_key: str, payloads: Sequence[Mapping[str, Any]]) -> list[OutboxEvent]:
    """Queue one event per payload, in one INSERT; must run inside the transaction of their cause.

    One statement whatever the count: a message's mention events are written while its room's
    row lock is held, and each round trip there makes the room's other writers wait.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("outbox events must be written inside the transaction of their cause")
    events = []
    for payload in payloads:
        event_id = uuid.uuid4()
        events.append(
            OutboxEvent(
                event_id=event_id,
                routing_key=routing_key,
                payload=event_envelope(routing_key=routing_key, event_id=event_id, fields=payload),
            )
        )
    return OutboxEvent.objects.bulk_create(events)


def unroutable_pending_events() -> dict[str, int]:
    """Pending events by routing key, for the keys no task in EVENT_TASKS consumes.

    publish_pending_events never selects them, so they wait forever (kept: nothing is lost) and
    `chat_outbox_oldest_pending_age_seconds` grows; this names them. Reads only pending rows
    (the partial index): the relay calls it once caught up, when little else is pending.
    """
    return dict(
        OutboxEvent.objects.filter(sent_at__isnull=True)
        .exclude(routing_key__in=list(EVENT_TASKS))
        .values("routing_key")
        .annotate(pending=Count("id"))
        .order_by()
        .values_list("routing_key", "pending")
    )


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
