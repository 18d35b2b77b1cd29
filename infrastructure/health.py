"""Reachability of the services the product needs, for /healthz and for start-up checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.db import connections
from kombu import Connection

from infrastructure.postgres import database_url

TIMEOUT_SECONDS = 2.0

HOW_TO_START = {
    "database": "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "channel_layer": (
        'start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
    ),
    "broker": "start it with: rabbitmq-server -detached",
}


# What stops working while each service is down, for /healthz's answer to anyone.
CONSEQUENCE = {
    "database": "PostgreSQL is not reachable: pages and history do not load and no message can be stored",
    "channel_layer": "Redis is not reachable: sockets cannot connect and stored messages reach no one live",
    "broker": (
        "RabbitMQ is not reachable: mention notifications and analytics wait in the outbox until it is back"
    ),
}


@dataclass(frozen=True)
class BrokerNodeState:
    """One node of CELERY_BROKER_URL as a check found it."""

    url: str  # password masked
    ok: bool
    error: str = ""  # why it did not answer, one line
    # The node this process's broker clients connect to now: the first that answers, in the
    # listed order (messaging.connection.broker_connect), so the first reachable one.
    in_use: bool = False


@dataclass(frozen=True)
class ServiceState:
    name: str
    url: str
    ok: bool
    error: str = ""
    # The broker's nodes, when CELERY_BROKER_URL lists a cluster's (`amqp://a;amqp://b;amqp://c`).
    nodes: tuple[BrokerNodeState, ...] = ()

    @property
    def degraded(self) -> bool:
        """Usable, but some of a cluster's nodes do not answer: one more loss may stop it."""
        return self.ok and any(not node.ok for node in self.nodes)

    def explain(self) -> str:
        """One sentence naming the service, where it was looked for, and how to start it."""
        label = {"database": "PostgreSQL", "channel_layer": "Redis", "broker": "RabbitMQ"}[self.name]
        return f"{label} is not reachable at {self.url} ({self.error}); {HOW_TO_START[self.name]}"

    def consequence(self, *, with_details: bool) -> str:
        """One sentence naming the service and what it stops (for a degraded cluster: how many of
        its nodes are missing); with_details adds the error and URL.

        Those details (hosts, ports, database and user names) are for the operators, not for anyone
        who can reach /healthz.
        """
        if self.degraded:
            down = sum(not node.ok for node in self.nodes)
            sentence = (
                f"{down} of {len(self.nodes)} RabbitMQ nodes {'is' if down == 1 else 'are'} not reachable: "
                "the others carry on while a majority of the cluster answers"
            )
        else:
            sentence = CONSEQUENCE[self.name]
        if not with_details:
            return sentence
        return f"{sentence} ({self.error}; at {self.url})"


def broker_nodes(broker_url: str) -> list[str]:
    """The nodes a broker URL lists: itself, or each of kombu's failover list (`amqp://a;amqp://b`)."""
    return [node.strip() for node in broker_url.split(";") if node.strip()]


def redacted_url(url: str) -> str:
    """The URL without its password; each node's, for a failover list (`amqp://a;amqp://b`)."""
    if ";" in url:
        return ";".join(redacted_url(node) for node in broker_nodes(url))
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def check_database() -> ServiceState:
    url = database_url(settings.DATABASES["default"])
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as error:  # any driver error means "not usable", reported not raised
        connections["default"].close()
        return ServiceState("database", url, False, first_line(error))
    return ServiceState("database", url, True)


def check_channel_layer() -> ServiceState:
    url = redacted_url(settings.REDIS_URL)
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=TIMEOUT_SECONDS)
        client.ping()
        client.close()
    except (redis.RedisError, OSError) as error:
        return ServiceState("channel_layer", url, False, first_line(error))
    return ServiceState("channel_layer", url, True)


def check_broker() -> ServiceState:
    """RabbitMQ: its one node, or each node of a cluster's failover URL.

    A cluster is usable while a majority of its nodes answers (quorum queues need one to accept
    and deliver messages): with fewer it is down, with a majority but not all it is degraded. So the
    URL lists every node of the cluster.
    """
    url = redacted_url(settings.CELERY_BROKER_URL)
    nodes = check_broker_nodes(settings.CELERY_BROKER_URL)
    if len(nodes) == 1:
        return ServiceState("broker", url, nodes[0].ok, nodes[0].error)
    answering = sum(node.ok for node in nodes)
    error = "; ".join(f"{node.url}: {node.error}" for node in nodes if not node.ok)
    if answering <= len(nodes) // 2:
        error = f"{answering} of {len(nodes)} nodes answer, a majority is needed: {error}"
    return ServiceState("broker", url, answering > len(nodes) // 2, error, nodes=tuple(nodes))


def check_broker_nodes(broker_url: str) -> list[BrokerNodeState]:
    """Each node of `broker_url`, all checked at once: a node that does not answer (a lost host, a
    partition) costs TIMEOUT_SECONDS in all, not once per node."""
    nodes = broker_nodes(broker_url)
    with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="broker-check") as pool:
        errors = list(pool.map(_broker_node_error, nodes))
    in_use = next((i for i, error in enumerate(errors) if error is None), None)
    return [
        BrokerNodeState(redacted_url(node), error is None, error or "", in_use=i == in_use)
        for i, (node, error) in enumerate(zip(nodes, errors, strict=True))
    ]


def _broker_node_error(node_url: str) -> str | None:
    """Why one node does not answer an AMQP handshake within TIMEOUT_SECONDS; None when it does."""
    timeouts = {"read_timeout": TIMEOUT_SECONDS, "write_timeout": TIMEOUT_SECONDS}
    try:
        with Connection(node_url, connect_timeout=TIMEOUT_SECONDS, transport_options=timeouts) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception as error:  # kombu and amqp raise many transport error types
        return first_line(error)
    return None


def check_all() -> list[ServiceState]:
    return [check_database(), check_channel_layer(), check_broker()]


def first_line(error: BaseException) -> str:
    """The first line of an error's text, for one-line log and status messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
