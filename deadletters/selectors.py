"""Reads: dead letters by filter, and the live state of every queue of the topology."""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from amqp.exceptions import AMQPError, NotFound
from django.conf import settings
from django.db.models import QuerySet
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError

from deadletters.models import DeadLetter
from messaging.topology import declared_queues

logger = logging.getLogger(__name__)

MANAGEMENT_TIMEOUT_SECONDS = 2.0


def dead_letters_matching(
    *,
    queue: str | None = None,
    reason: str | None = None,
    task: str | None = None,
    status: str | None = None,
    ids: Sequence[int] | None = None,
) -> QuerySet[DeadLetter]:
    """Dead letters filtered as `manage.py dlq` and the admin filter them, newest death first."""
    letters = DeadLetter.objects.all()
    if queue:
        letters = letters.filter(origin_queue=queue)
    if reason:
        letters = letters.filter(reason=reason)
    if task:
        letters = letters.filter(task_name=task)
    if status:
        letters = letters.filter(status=status)
    if ids:
        letters = letters.filter(pk__in=ids)
    return letters.order_by("-last_death_at", "-id")


def dead_letter_payload(dead_letter: DeadLetter) -> Any:
    """The body as data for people: parsed JSON when it is JSON, else the text or base64 string."""
    if dead_letter.body_encoding == DeadLetter.BodyEncoding.UTF8:
        try:
            return json.loads(dead_letter.body)
        except ValueError:
            return dead_letter.body
    return {"base64": dead_letter.body, "bytes": len(base64.b64decode(dead_letter.body))}


@dataclass(frozen=True)
class QueueStatus:
    name: str
    messages_ready: int | None
    messages_unacked: int | None
    consumers: int | None
    dead_letter_exchange: str | None
    dead_letter_routing_key: str | None
    message_ttl: int | None
    max_length: int | None
    overflow: str | None
    publish_rate: float | None
    deliver_rate: float | None
    ack_rate: float | None
    source: str  # "management API", "passive declare" or "unreachable: ..."

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arguments_status(arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "dead_letter_exchange": arguments.get("x-dead-letter-exchange"),
        "dead_letter_routing_key": arguments.get("x-dead-letter-routing-key"),
        "message_ttl": arguments.get("x-message-ttl"),
        "max_length": arguments.get("x-max-length"),
        "overflow": arguments.get("x-overflow"),
    }


def _management_queue(name: str, broker_url: str) -> dict[str, Any]:
    broker = urllib.parse.urlsplit(broker_url)
    vhost = urllib.parse.unquote(broker.path[1:]) if len(broker.path) > 1 else "/"
    api = urllib.parse.urlsplit(settings.RABBITMQ_MANAGEMENT_URL)
    # Credentials in the management URL win (docker-compose sets them there); else the broker's.
    user = api.username or broker.username or "guest"
    password = api.password or broker.password or "guest"
    base = api._replace(netloc=api.hostname + (f":{api.port}" if api.port else "")).geturl().rstrip("/")
    url = f"{base}/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name, safe='')}"
    request = urllib.request.Request(url)
    credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT_SECONDS) as response:
        return json.load(response)


def _rate(stats: dict[str, Any], key: str) -> float | None:
    details = stats.get(f"{key}_details")
    return float(details["rate"]) if isinstance(details, dict) and "rate" in details else None


def queue_statuses(*, broker_url: str | None = None) -> list[QueueStatus]:
    """Every queue of messaging/topology.py as the broker sees it right now.

    The management API (when the plugin is enabled) gives unacked counts and rates; without it a
    passive declare still gives ready messages and consumers, and the dead-letter settings are
    those the topology declares.
    """
    broker_url = broker_url or settings.CELERY_BROKER_URL
    statuses: list[QueueStatus] = []
    use_management = bool(settings.RABBITMQ_MANAGEMENT_URL)
    for queue in declared_queues():
        declared = _arguments_status(dict(queue.queue_arguments or {}))
        if use_management:
            try:
                data = _management_queue(queue.name, broker_url)
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    statuses.append(_missing(queue.name, declared, "management API: queue missing"))
                    continue
                use_management = False
                logger.info("management API answered %s; falling back to passive declares", error.code)
            except (OSError, ValueError) as error:
                use_management = False
                logger.info("management API unreachable (%s); falling back to passive declares", error)
            else:
                if "messages_ready" not in data:
                    # A queue the stats collector has not sampled yet (a few seconds after creation).
                    statuses.append(_passive_status(queue.name, declared, broker_url))
                    continue
                stats = data.get("message_stats") or {}
                statuses.append(
                    QueueStatus(
                        name=queue.name,
                        messages_ready=data.get("messages_ready"),
                        messages_unacked=data.get("messages_unacknowledged"),
                        consumers=data.get("consumers"),
                        **_arguments_status(data.get("arguments") or {}),
                        publish_rate=_rate(stats, "publish"),
                        deliver_rate=_rate(stats, "deliver_get"),
                        ack_rate=_rate(stats, "ack"),
                        source="management API",
                    )
                )
                continue
        statuses.append(_passive_status(queue.name, declared, broker_url))
    return statuses


def _missing(name: str, declared: dict[str, Any], source: str) -> QueueStatus:
    return QueueStatus(
        name=name,
        messages_ready=None,
        messages_unacked=None,
        consumers=None,
        **declared,
        publish_rate=None,
        deliver_rate=None,
        ack_rate=None,
        source=source,
    )


def _passive_status(name: str, declared: dict[str, Any], broker_url: str) -> QueueStatus:
    try:
        with Connection(broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=0)
            channel = conn.channel()
            try:
                _, ready, consumers = channel.queue_declare(name, passive=True)
            finally:
                try:
                    channel.close()
                except Exception:  # a NotFound already closed it on the broker's side
                    pass
    except NotFound:
        return _missing(name, declared, "passive declare: queue missing")
    except (OSError, AMQPError, KombuOperationalError) as error:
        return _missing(name, declared, f"unreachable: {error}")
    return QueueStatus(
        name=name,
        messages_ready=ready,
        # AMQP reports only ready messages and consumers; unacked counts and rates need the API.
        messages_unacked=None,
        consumers=consumers,
        **declared,
        publish_rate=None,
        deliver_rate=None,
        ack_rate=None,
        source="passive declare",
    )
