"""The relay's wire format: outbox rows as Celery protocol-2 task messages a stock worker consumes.

One message carries several events of one routing key as the task's single argument, `[events]`;
the task is the one EVENT_TASKS (messaging/events.py) names for the routing key.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import amqp
from celery import current_app
from django.utils import timezone

from messaging.events import EVENT_TASKS


@dataclass(frozen=True)
class TaskMessage:
    event_ids: list[int]  # outbox row ids carried by this message
    routing_key: str
    task_id: str
    message: amqp.Message


def task_message_build(*, routing_key: str, rows: list[tuple[int, dict[str, Any]]]) -> TaskMessage:
    """One Celery protocol-2 message for EVENT_TASKS[routing_key] with args `[events]`.

    Built with Celery's own `as_task_v2`, so a stock worker consumes it; `rows` are
    (outbox id, payload) in id order.
    """
    return task_message_from_json(
        routing_key=routing_key,
        row_ids=[row_id for row_id, _ in rows],
        events_json=[json.dumps(payload, separators=(",", ":")) for _, payload in rows],
        expiries=[payload["expires_at"] for _, payload in rows if payload.get("expires_at")],
    )


def task_message_from_json(
    *, routing_key: str, row_ids: list[int], events_json: list[str], expiries: list[str]
) -> TaskMessage:
    """task_message_build for events that are JSON text already (as PostgreSQL returns them)."""
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
