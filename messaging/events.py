"""Every event that crosses RabbitMQ, declared once: its routing key, payload, builder, parser, and
the task and queue that consume it.

Writers (chat.services, chat.notifications) build payloads here and messaging.outbox stores them;
the relay publishes the routing keys in EVENT_TASKS as task messages for their task; the tasks
(analytics, chat.tasks) parse them here; settings take the task routes from `task_routes`.
Adding an event is one EventType below (added to RELAYED_EVENTS) plus the task that consumes it.

Parse errors name fields, never their values: the worker logs them and the dead letter keeps
them, and a poison event may carry anything in any field, chat text included.

Settings import this module, so it loads no Django models (only messaging.topology).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypedDict, TypeVar

from messaging.topology import (
    ANALYTICS_QUEUE,
    MONITORING_QUEUE,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
)

EventT = TypeVar("EventT")


class InvalidEvent(ValueError):
    """A payload that can never be consumed (wrong shape or type); retrying it cannot help."""


@dataclass(frozen=True)
class EventType(Generic[EventT]):
    routing_key: str
    # The Celery task that consumes it: the relay publishes each batch of these events as one
    # task message with args `[events]`. Task names are wire contracts (queued messages, dead letters).
    task_name: str
    # The queue its binding reaches (messaging.topology owns the Queue); the task is routed there too.
    queue_name: str
    # One payload -> the typed event; raises InvalidEvent.
    parse: Callable[[object], EventT]

    def parse_batch(self, events: object) -> list[EventT]:
        """A task's argument: a list of payloads, each parsed; raises InvalidEvent on the first bad one."""
        if not isinstance(events, list):
            raise InvalidEvent(f"a task's argument must be a list of events, got {type(events).__name__}")
        return [self.parse(event) for event in events]


class EventEnvelope(TypedDict):
    """The fields every stored event carries besides its own (messaging.outbox adds them)."""

    event_id: str
    type: str  # the routing key


def event_envelope(*, routing_key: str, event_id: uuid.UUID, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An event's stored payload: its own fields, plus its id and type for the consumers."""
    return {**fields, "event_id": str(event_id), "type": routing_key}


def value_shape(value: object) -> str:
    """What an invalid field held, for an error message: numbers as they are, text only by its length."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (str, bytes, Sequence, Mapping)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


# chat.message.created: one per stored message, written in the message's own INSERT (chat.services).


class MessageCreatedFields(TypedDict):
    """The fields known before the message's INSERT."""

    room_id: int
    room: str  # the room's slug
    author_id: int


class MessageCreatedInsertFields(TypedDict):
    """The fields only the message's INSERT knows; the statement adds them (message_created_insert_sql)."""

    message_id: int
    seq: int
    created_at: str  # ISO 8601, UTC


class MessageCreatedPayload(EventEnvelope, MessageCreatedFields, MessageCreatedInsertFields):
    pass


@dataclass(frozen=True)
class MessageCreated:
    event_id: uuid.UUID
    message_id: int
    room_id: int
    author_id: int
    created_at: datetime


def message_created_fields(*, room_id: int, room: str, author_id: int) -> MessageCreatedFields:
    return MessageCreatedFields(room_id=room_id, room=room, author_id=author_id)


def message_created_payload(
    *,
    event_id: uuid.UUID,
    room_id: int,
    room: str,
    author_id: int,
    message_id: int,
    seq: int,
    created_at: datetime,
) -> MessageCreatedPayload:
    """The whole stored payload, as chat.services' INSERT completes it (benchmarks and tests write these)."""
    return MessageCreatedPayload(
        event_id=str(event_id),
        type=MESSAGE_CREATED.routing_key,
        room_id=room_id,
        room=room,
        author_id=author_id,
        message_id=message_id,
        seq=seq,
        # The INSERT's format: UTC, always with microseconds.
        created_at=created_at.astimezone(UTC).isoformat(timespec="microseconds"),
    )


def message_created_insert_sql(*, message_id: str, seq: str, created_at: str) -> str:
    """The SQL expression (a jsonb object) of MessageCreatedInsertFields, from the INSERT's columns.

    Each argument is the SQL expression of that field; `created_at` must give ISO 8601 text.
    """
    return f"jsonb_build_object('message_id', {message_id}, 'seq', {seq}, 'created_at', {created_at})"


def _positive_int(event: Mapping[str, Any], key: str) -> int:
    value = event.get(key)
    # bool is an int in Python; True must not pass for a room id.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidEvent(f"{key} must be a positive integer, got {value_shape(value)}")
    return value


def message_created_parse(event: object) -> MessageCreated:
    """Validate one chat.message.created payload; raises InvalidEvent."""
    if not isinstance(event, Mapping):
        raise InvalidEvent(f"an event must be an object, got {type(event).__name__}")
    if event.get("type") != MESSAGE_CREATED.routing_key:
        raise InvalidEvent(f"unexpected event type, got {value_shape(event.get('type'))}")
    try:
        event_id = uuid.UUID(str(event["event_id"]))
    except (KeyError, ValueError):
        raise InvalidEvent(f"event_id must be a UUID, got {value_shape(event.get('event_id'))}") from None
    created_at_text = event.get("created_at")
    try:
        created_at = datetime.fromisoformat(created_at_text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidEvent(
            f"created_at must be an ISO 8601 time, got {value_shape(created_at_text)}"
        ) from None
    if created_at.tzinfo is None:
        raise InvalidEvent("created_at must carry a time zone")
    return MessageCreated(
        event_id=event_id,
        message_id=_positive_int(event, "message_id"),
        room_id=_positive_int(event, "room_id"),
        author_id=_positive_int(event, "author_id"),
        created_at=created_at,
    )


MESSAGE_CREATED: EventType[MessageCreated] = EventType(
    routing_key="chat.message.created",
    task_name="analytics.record_chat_events",
    # Bound by the pattern chat.message.* (messaging.topology).
    queue_name=ANALYTICS_QUEUE.name,
    parse=message_created_parse,
)


# chat.mention and chat.mention.vip: one per mentioned user, written in the message's transaction
# (chat.notifications). A VIP's mentions have a routing key, queue and notifier of their own
# (VIP_MENTION below, messaging.topology), which is what puts them ahead of everyone else's.

# Whether a mention was a VIP's, as the delivery ledger records it (chat.models.NotificationDelivery,
# the admin's filter). Routing never looks at it: the event type decides the queue.
PRIORITY_LOW = 0
PRIORITY_HIGH = 9
MENTION_KIND = "mention"


class MentionFields(TypedDict):
    kind: str
    user_id: int  # who is mentioned
    message_id: int
    room_id: int
    author_id: int
    priority: int
    queued_at: str  # ISO 8601
    # ISO 8601; the relay turns it into the AMQP per-message TTL.
    expires_at: str


class MentionPayload(EventEnvelope, MentionFields):
    pass


@dataclass(frozen=True)
class Mention:
    notification_id: uuid.UUID  # the event's id
    user_id: int
    message_id: int
    priority: int
    queued_at: datetime
    expires_at: datetime


def mention_priority(*, author_is_vip: bool) -> int:
    return PRIORITY_HIGH if author_is_vip else PRIORITY_LOW


def mention_fields(
    *,
    user_id: int,
    message_id: int,
    room_id: int,
    author_id: int,
    priority: int,
    queued_at: datetime,
    expires_at: datetime,
) -> MentionFields:
    return MentionFields(
        kind=MENTION_KIND,
        user_id=user_id,
        message_id=message_id,
        room_id=room_id,
        author_id=author_id,
        priority=priority,
        queued_at=queued_at.isoformat(),
        expires_at=expires_at.isoformat(),
    )


_MENTION_REQUIRED = ("event_id", "user_id", "message_id", "expires_at", "queued_at")


def mention_parse(event: object) -> Mention:
    """Validate one chat.mention payload; raises InvalidEvent."""
    if not isinstance(event, dict) or any(field not in event for field in _MENTION_REQUIRED):
        raise InvalidEvent(f"a mention event needs {', '.join(_MENTION_REQUIRED)}")
    try:
        return Mention(
            notification_id=uuid.UUID(str(event["event_id"])),
            user_id=int(event["user_id"]),
            message_id=int(event["message_id"]),
            priority=int(event.get("priority", PRIORITY_LOW)),
            queued_at=datetime.fromisoformat(event["queued_at"]),
            expires_at=datetime.fromisoformat(event["expires_at"]),
        )
    except (TypeError, ValueError):
        # Not chained: the parser's error quotes the value.
        raise InvalidEvent(
            "malformed mention event: event_id must be a UUID, user_id, message_id and priority "
            "integers, queued_at and expires_at ISO 8601 times"
        ) from None


MENTION: EventType[Mention] = EventType(
    routing_key="chat.mention",
    task_name="chat.deliver_mention_notifications",
    queue_name=NOTIFICATIONS_QUEUE_NAME,
    parse=mention_parse,
)
# The same payload and delivery service as MENTION; its own task name, so the VIP notifier's
# task counters and a VIP mention's dead letter say which path it took.
VIP_MENTION: EventType[Mention] = EventType(
    routing_key="chat.mention.vip",
    task_name="chat.deliver_vip_mention_notifications",
    queue_name=VIP_NOTIFICATIONS_QUEUE_NAME,
    parse=mention_parse,
)


def mention_event(*, author_is_vip: bool) -> EventType[Mention]:
    """The event type a mention is queued as: a VIP author's mentions go to the VIP queue."""
    return VIP_MENTION if author_is_vip else MENTION


# The relay publishes only these; an outbox event with any other routing key stays pending.
RELAYED_EVENTS: tuple[EventType[Any], ...] = (MESSAGE_CREATED, MENTION, VIP_MENTION)
EVENT_TASKS: dict[str, str] = {event.routing_key: event.task_name for event in RELAYED_EVENTS}

# Tasks Celery beat sends, by the queue of the worker that owns their data.
BEAT_TASK_QUEUES: dict[str, str] = {
    "analytics.prune_processed_events": ANALYTICS_QUEUE.name,
    "chat.send_notification_fallback_emails": NOTIFICATIONS_QUEUE_NAME,
    "monitoring.check_alerts": MONITORING_QUEUE.name,
}


def task_routes() -> dict[str, dict[str, str]]:
    """CELERY_TASK_ROUTES: every event's task to its event's queue, every beat task to its own."""
    return {
        **{event.task_name: {"queue": event.queue_name} for event in RELAYED_EVENTS},
        **{task_name: {"queue": queue_name} for task_name, queue_name in BEAT_TASK_QUEUES.items()},
    }
