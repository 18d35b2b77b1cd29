"""The room WebSocket protocol: every frame type, error code and close code (docs/protocol.md)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

from django.conf import settings

from chat.models import Message
from chat.selectors import user_is_vip

# Client -> server
TYPE_MESSAGE = "message"
TYPE_NOTIFICATION_ACK = "notification_ack"

# Server -> client
TYPE_SYNCED = "synced"
TYPE_RESYNC = "resync"
TYPE_ERROR = "error"
TYPE_NOTIFICATION = "notification"

# Error codes of {"type": "error"} frames; the socket stays open after each.
ERROR_INVALID_JSON = "invalid_json"
ERROR_INVALID_MESSAGE = "invalid_message"
ERROR_TOO_LONG = "too_long"
ERROR_FRAME_TOO_LARGE = "frame_too_large"
ERROR_RATE_LIMITED = "rate_limited"
ERROR_UNAVAILABLE = "unavailable"
ERROR_INTERNAL = "internal_error"

# Close codes for a socket that is refused after the handshake, or whose access ends while it is
# open (chat/access.py): the session or its user is gone, the room is forbidden, the room is gone.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_ROOM_NOT_FOUND = 4404


class MessageFrame(TypedDict):
    type: str
    id: int
    seq: int
    room: str
    user: str
    text: str
    created_at: str
    client_id: str
    vip: bool


# The field is named "from" on the wire, a keyword in Python.
NotificationFrame = TypedDict(
    "NotificationFrame",
    {"type": str, "id": str, "kind": str, "message_id": int, "room": str, "from": str, "text": str},
)


class ErrorFrame(TypedDict):
    type: str
    code: str
    detail: str
    client_id: str | None


@dataclass(frozen=True)
class SendMessage:
    """A validated client request to post a message."""

    text: str
    client_id: uuid.UUID


@dataclass(frozen=True)
class AcknowledgeNotification:
    """A page showed the user the notification `notification_id` (a notification frame's `id`)."""

    notification_id: uuid.UUID


class ProtocolError(Exception):
    """A client frame that cannot be acted on; becomes an error frame, never a closed socket."""

    def __init__(self, code: str, detail: str, client_id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.client_id = client_id

    def frame(self) -> ErrorFrame:
        return error_frame(self.code, self.detail, self.client_id)


def parse_client_frame(raw: str | bytes | None) -> SendMessage | AcknowledgeNotification:
    """Turn one raw client frame into a request, or raise ProtocolError saying what is wrong."""
    if raw is None:
        raise ProtocolError(ERROR_INVALID_JSON, "Frames must be JSON text.")
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > settings.CHAT_MAX_FRAME_BYTES:
        raise ProtocolError(
            ERROR_FRAME_TOO_LARGE, f"Frames may be at most {settings.CHAT_MAX_FRAME_BYTES} bytes."
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(ERROR_INVALID_JSON, "The frame is not valid JSON.") from None
    except RecursionError:
        # Thousands of nested arrays fit in a frame; the parser gives up cleanly, nothing is wrong here.
        raise ProtocolError(ERROR_INVALID_JSON, "The frame's JSON is nested too deeply.") from None
    if not isinstance(data, dict):
        raise ProtocolError(ERROR_INVALID_MESSAGE, "A frame must be a JSON object.")
    if data.get("type") == TYPE_NOTIFICATION_ACK:
        return _parse_notification_ack(data)
    client_id = data.get("client_id")
    echo_id = client_id if isinstance(client_id, str) else None
    if data.get("type") != TYPE_MESSAGE:
        raise ProtocolError(ERROR_INVALID_MESSAGE, "Unknown frame type.", echo_id)
    try:
        parsed_id = uuid.UUID(client_id)
    except (TypeError, ValueError, AttributeError):
        raise ProtocolError(ERROR_INVALID_MESSAGE, "client_id must be a UUID.", echo_id) from None
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError(ERROR_INVALID_MESSAGE, "text must be a non-blank string.", echo_id)
    if "\x00" in text or not _encodable(text):
        # PostgreSQL text cannot hold NUL, and a lone surrogate ("\ud800" in JSON) is no UTF-8.
        raise ProtocolError(ERROR_INVALID_MESSAGE, "text contains characters that cannot be stored.", echo_id)
    if len(text) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise ProtocolError(
            ERROR_TOO_LONG,
            f"Messages may be at most {settings.CHAT_MAX_MESSAGE_CHARS} characters.",
            echo_id,
        )
    return SendMessage(text=text, client_id=parsed_id)


def _parse_notification_ack(data: dict[str, Any]) -> AcknowledgeNotification:
    try:
        return AcknowledgeNotification(notification_id=uuid.UUID(data.get("id")))
    except (TypeError, ValueError, AttributeError):
        raise ProtocolError(ERROR_INVALID_MESSAGE, "id must be a notification's id (a UUID).") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def message_frame(message: Message) -> MessageFrame:
    """The one shape of a message, for the socket and for the history API alike."""
    return {
        "type": TYPE_MESSAGE,
        "id": message.id,
        "seq": message.seq,
        "room": message.room.slug,
        "user": message.author.get_username(),
        "text": message.text,
        "created_at": message.created_at.isoformat(),
        "client_id": str(message.client_id),
        "vip": _author_is_vip(message),
    }


def _author_is_vip(message: Message) -> bool:
    # The selectors annotate `author_is_vip` and message_create sets it, so a page of frames
    # costs no query per message; anything else pays one query.
    is_vip = getattr(message, "author_is_vip", None)
    if is_vip is None:
        is_vip = message.author_is_vip = user_is_vip(user=message.author)
    return bool(is_vip)


def mention_notification_frame(
    message: Message, *, notification_id: uuid.UUID, text_chars: int
) -> NotificationFrame:
    """What a mentioned user's sockets receive; `text` is the start of the message."""
    text = message.text if len(message.text) <= text_chars else message.text[: text_chars - 1] + "…"
    return {
        "type": TYPE_NOTIFICATION,
        "id": str(notification_id),
        "kind": "mention",
        "message_id": message.id,
        "room": message.room.slug,
        "from": message.author.get_username(),
        "text": text,
    }


def error_frame(code: str, detail: str, client_id: str | None = None) -> ErrorFrame:
    return {"type": TYPE_ERROR, "code": code, "detail": detail, "client_id": client_id}


def synced_frame(last_id: int) -> dict[str, Any]:
    return {"type": TYPE_SYNCED, "last_id": last_id}


def resync_frame() -> dict[str, Any]:
    return {"type": TYPE_RESYNC}


def room_group(room_id: int) -> str:
    """Group names come from ids, never from user-supplied text."""
    return f"room.{room_id}"


def user_group(user_id: int) -> str:
    """Every open socket of one user, whatever its room: notifications go here."""
    return f"user.{user_id}"
