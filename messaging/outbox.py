"""Writing events to the transactional outbox; messaging/relay.py moves them to RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from django.db import connection

from messaging.events import event_envelope
from messaging.models import OutboxEvent

# The relay LISTENs on this channel. A trigger on the outbox table NOTIFYs it for every INSERT
# (migration chat 0004); PostgreSQL delivers a NOTIFY only when (and if) the transaction that
# issued it commits, and folds duplicates within one transaction.
OUTBOX_NOTIFY_CHANNEL = "chat_outbox"


def outbox_event_add(*, routing_key: str, payload: Mapping[str, Any], priority: int = 0) -> OutboxEvent:
    """Queue an event for publication; must run inside the transaction of its cause.

    `payload` holds the event's own fields (from its builder in messaging.events); the stored
    payload adds the envelope (event_id, type).
    """
    [event] = outbox_events_add(routing_key=routing_key, payloads=[payload], priority=priority)
    return event


def outbox_events_add(
    *, routing_key: str, payloads: Sequence[Mapping[str, Any]], priority: int = 0
) -> list[OutboxEvent]:
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
                priority=priority,
            )
        )
    return OutboxEvent.objects.bulk_create(events)
