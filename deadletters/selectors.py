"""Reads: dead letters by filter, and the live state of every queue of the topology and every broker node."""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

from amqp.exceptions import NotFound
from django.conf import settings
from django.db.models import QuerySet

from deadletters.models import DeadLetter
from infrastructure.health import broker_nodes, check_broker_nodes
from messaging.connection import BrokerUnavailable, broker_connection, broker_node
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
    # Where the answer came from: the management API's address, or the broker node's (no password).
    via: str = ""
    # From the management API only (`_placement`).
    queue_type: str | None = None
    leader: str | None = None
    members: list[str] | None = None
    online: list[str] | None = None

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


@dataclass(frozen=True)
class ManagementApi:
    """One node's management API, read with the vhost (and, unless its URL has its own, the
    credentials) of the broker node at the same position in CELERY_BROKER_URL."""

    base: str  # scheme, host and port: no credentials, so it can be shown
    user: str
    password: str
    vhost: str

    def get(self, path: str) -> Any:
        """GET /api/<path> (path segments quoted by the caller); raises urllib's errors."""
        request = urllib.request.Request(f"{self.base}/api/{path}")
        credentials = f"{self.user}:{self.password}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT_SECONDS) as response:
            return json.load(response)


def management_apis(broker_url: str) -> list[ManagementApi]:
    """The management APIs of RABBITMQ_MANAGEMENT_URL (empty: none), in its order.

    On a cluster it lists one per node, matched to CELERY_BROKER_URL's nodes by position (each node
    serves its own; chatproject/settings.py checks the counts); a single one serves every node.
    """
    nodes = broker_nodes(broker_url)
    urls = [url.strip() for url in settings.RABBITMQ_MANAGEMENT_URL.split(";") if url.strip()]
    return [_management_api(url, nodes[min(i, len(nodes) - 1)]) for i, url in enumerate(urls)]


def _management_api(url: str, broker_node_url: str) -> ManagementApi:
    api, broker = urllib.parse.urlsplit(url), urllib.parse.urlsplit(broker_node_url)
    netloc = api.hostname + (f":{api.port}" if api.port else "")
    return ManagementApi(
        base=api._replace(netloc=netloc).geturl().rstrip("/"),
        # Credentials in the management URL win (docker-compose sets them there); else the broker's.
        user=urllib.parse.unquote(api.username or broker.username or "guest"),
        password=urllib.parse.unquote(api.password or broker.password or "guest"),
        vhost=urllib.parse.unquote(broker.path[1:]) if len(broker.path) > 1 else "/",
    )


def _management_queues(broker_url: str) -> tuple[ManagementApi, dict[str, dict[str, Any]]] | None:
    """Every queue of the vhost from the first management API that answers, by name; None when
    none does (or one refuses: the others would too, users being cluster-wide)."""
    for api in management_apis(broker_url):
        try:
            rows = api.get(f"queues/{urllib.parse.quote(api.vhost, safe='')}")
        except urllib.error.HTTPError as error:
            if error.code == 404:  # no such vhost: none of its queues exists
                return api, {}
            logger.info(
                "management API at %s answered %s; falling back to passive declares", api.base, error.code
            )
            return None
        except (OSError, ValueError) as error:
            logger.info("management API at %s unreachable (%s); trying the next", api.base, error)
            continue
        return api, {row["name"]: row for row in rows}
    return None


def _rate(stats: dict[str, Any], key: str) -> float | None:
    details = stats.get(f"{key}_details")
    return float(details["rate"]) if isinstance(details, dict) and "rate" in details else None


def queue_statuses(*, broker_url: str | None = None) -> list[QueueStatus]:
    """Every queue of messaging/topology.py as the broker sees it right now.

    The management API (when the plugin is enabled) gives unacked counts, rates, and where each
    queue lives (leader, members); on a cluster the first node's API that answers is used. Without
    it a passive declare, through the first broker node that answers, still gives ready messages and
    consumers, and the dead-letter settings are those the topology declares.
    """
    broker_url = broker_url or settings.CELERY_BROKER_URL
    declared = {q.name: _arguments_status(dict(q.queue_arguments or {})) for q in declared_queues()}
    listed = _management_queues(broker_url)
    if listed is None:
        statuses = _passive_statuses(list(declared), declared, broker_url)
        return [statuses[name] for name in declared]
    api, rows = listed
    statuses = {}
    # Queues the stats collector has not sampled yet (a few seconds after their creation, or after
    # their leader moved): counts by passive declare, the rest from the API.
    unsampled = {name: rows[name] for name in declared if name in rows and "messages_ready" not in rows[name]}
    if unsampled:
        passive = _passive_statuses(list(unsampled), declared, broker_url)
        statuses.update({name: replace(passive[name], **_placement(row)) for name, row in unsampled.items()})
    for name in declared:
        if name not in rows:
            statuses[name] = _missing(name, declared[name], "management API: queue missing", via=api.base)
        elif name not in unsampled:
            statuses[name] = _management_status(rows[name], via=api.base)
    return [statuses[name] for name in declared]


def _placement(row: dict[str, Any]) -> dict[str, Any]:
    """Where the management API says a queue lives: its type, the node holding it (a quorum queue's
    leader, a classic queue's home), a quorum queue's members and those of them online."""
    return {
        "queue_type": row.get("type"),
        "leader": row.get("leader") or row.get("node"),
        "members": row.get("members"),
        "online": row.get("online"),
    }


def _management_status(data: dict[str, Any], *, via: str) -> QueueStatus:
    stats = data.get("message_stats") or {}
    return QueueStatus(
        name=data["name"],
        messages_ready=data.get("messages_ready"),
        messages_unacked=data.get("messages_unacknowledged"),
        consumers=data.get("consumers"),
        **_arguments_status(data.get("arguments") or {}),
        publish_rate=_rate(stats, "publish"),
        deliver_rate=_rate(stats, "deliver_get"),
        ack_rate=_rate(stats, "ack"),
        source="management API",
        via=via,
        **_placement(data),
    )


def _missing(name: str, declared: dict[str, Any], source: str, *, via: str = "") -> QueueStatus:
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
        via=via,
    )


def _passive_statuses(
    names: list[str], declared: dict[str, dict[str, Any]], broker_url: str
) -> dict[str, QueueStatus]:
    """Ready messages and consumers of each queue by passive declares, through one connection."""
    statuses: dict[str, QueueStatus] = {}
    try:
        with broker_connection(broker_url) as connection:
            via = broker_node(connection)
            for name in names:
                # A passive declare of a missing queue closes the channel: one channel per queue.
                channel = connection.channel()
                try:
                    _, ready, consumers = channel.queue_declare(name, passive=True)
                except NotFound:
                    statuses[name] = _missing(name, declared[name], "passive declare: queue missing", via=via)
                    continue
                finally:
                    try:
                        channel.close()
                    except Exception:  # a NotFound already closed it on the broker's side
                        pass
                statuses[name] = QueueStatus(
                    name=name,
                    messages_ready=ready,
                    # AMQP reports only ready messages and consumers; unacked counts and rates need the API.
                    messages_unacked=None,
                    consumers=consumers,
                    **declared[name],
                    publish_rate=None,
                    deliver_rate=None,
                    ack_rate=None,
                    source="passive declare",
                    via=via,
                )
    except BrokerUnavailable as error:
        return {name: _missing(name, declared[name], f"unreachable: {error}") for name in names}
    return statuses


@dataclass(frozen=True)
class BrokerNodeStatus:
    """One node of CELERY_BROKER_URL, for the broker status page."""

    position: int  # 1-based, in CELERY_BROKER_URL's order
    url: str  # password masked
    reachable: bool
    error: str  # why not, one line
    in_use: bool  # the node this process's broker clients connect to (the first that answers)
    name: str | None  # RabbitMQ's name for it (the queues' leader and members), from its management API


def broker_node_statuses(*, broker_url: str | None = None) -> list[BrokerNodeStatus]:
    """Each node of CELERY_BROKER_URL: reachable or not and why, whether this process uses it, and its
    name from its own management API when RABBITMQ_MANAGEMENT_URL lists one per node.

    Every node is asked at once, so a node that does not answer costs one timeout, not one per node.
    """
    broker_url = broker_url or settings.CELERY_BROKER_URL
    nodes = broker_nodes(broker_url)
    apis = management_apis(broker_url)
    apis_by_node: list[ManagementApi | None] = apis if len(apis) == len(nodes) else [None] * len(nodes)
    with ThreadPoolExecutor(max_workers=len(nodes) + 1, thread_name_prefix="broker-status") as pool:
        checked = pool.submit(check_broker_nodes, broker_url)
        names = list(pool.map(_node_name, apis_by_node))
        states = checked.result()
    return [
        BrokerNodeStatus(position, state.url, state.ok, state.error, state.in_use, name)
        for position, (state, name) in enumerate(zip(states, names, strict=True), start=1)
    ]


def _node_name(api: ManagementApi | None) -> str | None:
    """The name of the node serving `api` (its /api/overview), or None when it does not answer."""
    if api is None:
        return None
    try:
        return api.get("overview").get("node")
    except (OSError, ValueError, AttributeError):
        return None
