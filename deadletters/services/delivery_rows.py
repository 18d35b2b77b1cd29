"""A delivery from `dead_letters` as the archive stores it: a DeadLetter row, unsaved.

Pure functions, no queries: the message cleaned up for PostgreSQL (json_safe), described from
RabbitMQ's `x-death`, and fingerprinted; or, when the database refused that row, the minimal row
that keeps the raw body.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.utils import timezone

from deadletters.models import DeadLetter

# Room kept for the storage error in a minimal row; a driver message can quote a huge value.
MINIMAL_ROW_ERROR_CHARS = 4000


def json_safe(value: Any) -> Any:
    """AMQP header and property values as JSON: times as ISO strings, bytes as text or base64."""
    if isinstance(value, Mapping):
        return {_json_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = _storable_text(bytes(value))
        return text if text is not None else base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, str):
        return _json_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # jsonb has no NaN or Infinity
    return value


def _json_text(text: str) -> str:
    """`text` as jsonb and text columns take it: no NUL, no lone surrogate (py-amqp decodes header
    strings with surrogatepass). The letter is still shown, with U+FFFD or ? in their place."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _storable_text(raw: bytes) -> str | None:
    """`raw` as text when PostgreSQL can store it as such: UTF-8 without NUL (text columns refuse it)."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def body_bytes(body: bytes | str | None, encoding: str | None) -> bytes:
    """A message body as the bytes it was sent as (py-amqp decodes one with a content_encoding)."""
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode(encoding or "utf-8")
    return bytes(body)


def _death_time(entry: Mapping[str, Any]) -> datetime | None:
    value = entry.get("time")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=UTC)
    return None


def _expiry_or_overflow_message(reason: str, queue: str, entry: Mapping[str, Any]) -> str:
    if reason == "expired":
        ttl = entry.get("original-expiration")
        ttl_text = f"message TTL of {json_safe(ttl)} ms" if ttl is not None else "queue message TTL"
        return f"{ttl_text} ran out in queue {queue!r} before any consumer took it"
    if reason == "maxlen":
        return f"queue {queue!r} was over its length limit (x-max-length / x-max-length-bytes)"
    if reason == "delivery_limit":
        return f"queue {queue!r} delivered it more times than its delivery limit"
    return ""


def _undecodable_error(raw: bytes, properties: Mapping[str, Any]) -> tuple[str, str]:
    """(error class, message) when a JSON body cannot be decoded: the worker rejects those
    before any task runs (messaging/worker_intake.py), so no failure record comes for them."""
    if properties.get("content_type") != "application/json":
        return "", ""
    try:
        json.loads(raw.decode(properties.get("content_encoding") or "utf-8"))
    except (UnicodeDecodeError, LookupError, ValueError) as error:
        return "kombu.exceptions.DecodeError", f"the body cannot be decoded as JSON: {error}"
    return "", ""


@dataclass(frozen=True)
class _StoredMessage:
    """A delivery's message as the archive stores it, and the fingerprint of that form."""

    raw: bytes
    body: str
    body_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    fingerprint: str


def _stored_message(delivery: Mapping[str, Any]) -> _StoredMessage:
    properties = {k: v for k, v in (delivery.get("properties") or {}).items() if k != "application_headers"}
    raw = body_bytes(delivery.get("body"), properties.get("content_encoding"))
    body_text = _storable_text(raw)
    if body_text is not None:
        body_encoding = DeadLetter.BodyEncoding.UTF8
    else:
        body_text, body_encoding = base64.b64encode(raw).decode("ascii"), DeadLetter.BodyEncoding.BASE64
    safe_headers = json_safe(dict(delivery.get("headers") or {}))
    safe_properties = json_safe(properties)
    # RabbitMQ redelivers a message unchanged, so every delivery of one dead letter has the same.
    fingerprint = hashlib.sha256(
        json.dumps([safe_properties, safe_headers, body_text], sort_keys=True, default=str).encode()
    ).hexdigest()
    return _StoredMessage(raw, body_text, body_encoding, safe_headers, safe_properties, fingerprint)


def dead_letter_from_delivery(delivery: Mapping[str, Any]) -> DeadLetter:
    """The (unsaved) row for one delivery from `dead_letters`; the origin comes from x-death."""
    stored = _stored_message(delivery)
    headers = dict(delivery.get("headers") or {})
    properties = delivery.get("properties") or {}
    x_death = [entry for entry in headers.get("x-death") or [] if isinstance(entry, Mapping)]
    # x-death lists the most recent death first, one entry per (queue, reason).
    latest = x_death[0] if x_death else {}
    routing_keys = latest.get("routing-keys") or [delivery.get("routing_key", "")]
    times = [t for t in (_death_time(entry) for entry in x_death) if t is not None]
    reason = str(latest.get("reason") or headers.get("x-first-death-reason") or "unknown")
    origin_queue = str(latest.get("queue") or headers.get("x-first-death-queue") or "")
    retries = headers.get("retries")
    error_class, error_message = _undecodable_error(stored.raw, properties)
    return DeadLetter(
        fingerprint=stored.fingerprint,
        origin_queue=origin_queue,
        origin_exchange=str(latest.get("exchange", delivery.get("exchange", "")) or ""),
        routing_key=str(json_safe(routing_keys[0]) if routing_keys else ""),
        reason=reason,
        task_name=str(headers.get("task") or ""),
        task_id=str(headers.get("id") or properties.get("correlation_id") or ""),
        message_id=str(properties.get("message_id") or ""),
        error_class=error_class,
        error_message=error_message or _expiry_or_overflow_message(reason, origin_queue, latest),
        attempts=int(retries) + 1 if isinstance(retries, int) else None,
        death_count=sum(int(entry.get("count") or 1) for entry in x_death) or 1,
        first_death_at=min(times) if times else None,
        last_death_at=max(times) if times else timezone.now(),
        x_death=json_safe(x_death),
        headers=stored.headers,
        properties=stored.properties,
        body=stored.body,
        body_encoding=stored.body_encoding,
        ack_pending=True,
    )


def minimal_dead_letter(delivery: Mapping[str, Any], *, error: BaseException) -> DeadLetter:
    """The row for a delivery whose full row could not be stored: the raw body as base64 (replayable
    byte for byte), the headers and properties as json_safe makes them, and the storage error.
    Every value taken from the message is cleaned and cut to its column, so that what made the
    full row fail cannot make this one fail too."""
    stored = _stored_message(delivery)
    x_death = stored.headers.get("x-death")
    x_death = [entry for entry in x_death if isinstance(entry, dict)] if isinstance(x_death, list) else []
    latest = x_death[0] if x_death else {}
    routing_keys = latest.get("routing-keys")
    routing_key = routing_keys[0] if isinstance(routing_keys, list) and routing_keys else None
    trace = "".join(traceback.format_exception(error))
    return DeadLetter(
        fingerprint=stored.fingerprint,
        origin_queue=_column_text("origin_queue", latest.get("queue")),
        origin_exchange=_column_text("origin_exchange", latest.get("exchange", delivery.get("exchange"))),
        routing_key=_column_text("routing_key", routing_key or delivery.get("routing_key")),
        reason=_column_text("reason", latest.get("reason") or "unknown"),
        task_name=_column_text("task_name", stored.headers.get("task")),
        task_id=_column_text("task_id", stored.headers.get("id") or stored.properties.get("correlation_id")),
        message_id=_column_text("message_id", stored.properties.get("message_id")),
        error_class=_column_text("error_class", _error_class_path(error)),
        error_message=_json_text(
            "Archived in minimal form (body as base64, without the worker's error): the full row "
            f"was refused with {_error_class_path(error)}: {error}"
        )[:MINIMAL_ROW_ERROR_CHARS],
        traceback=_json_text(trace)[-MINIMAL_ROW_ERROR_CHARS:],
        last_death_at=timezone.now(),
        x_death=x_death,
        headers=stored.headers,
        properties=stored.properties,
        body=base64.b64encode(stored.raw).decode("ascii"),
        body_encoding=DeadLetter.BodyEncoding.BASE64,
        ack_pending=True,
    )


def _column_text(field_name: str, value: Any) -> str:
    text = "" if value is None else _json_text(str(value))
    return text[: DeadLetter._meta.get_field(field_name).max_length]


def _error_class_path(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"


def storage_error_label(error: BaseException) -> str:
    """What a log line may say about a storage error: its class and SQLSTATE, never its text,
    which can quote the message's content."""
    sqlstate = getattr(error.__cause__, "pgcode", None)  # psycopg2's name for it
    return f"{_error_class_path(error)}, SQLSTATE {sqlstate}" if sqlstate else _error_class_path(error)
