"""Reachability of the services the product needs, for /healthz and for start-up checks."""

from __future__ import annotations

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
class ServiceState:
    name: str
    url: str
    ok: bool
    error: str = ""

    def explain(self) -> str:
        """One sentence naming the service, where it was looked for, and how to start it."""
        label = {"database": "PostgreSQL", "channel_layer": "Redis", "broker": "RabbitMQ"}[self.name]
        return f"{label} is not reachable at {self.url} ({self.error}); {HOW_TO_START[self.name]}"

    def consequence(self, *, with_details: bool) -> str:
        """One sentence naming the service and what it stops; with_details adds the error and URL.

        Those details (hosts, ports, database and user names) are for the operators, not for anyone
        who can reach /healthz.
        """
        if not with_details:
            return CONSEQUENCE[self.name]
        return f"{CONSEQUENCE[self.name]} ({self.error}; at {self.url})"


def redacted_url(url: str) -> str:
    """The URL without its password; each node's, for a failover list (`amqp://a;amqp://b`)."""
    if ";" in url:
        return ";".join(redacted_url(node) for node in url.split(";"))
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
    url = redacted_url(settings.CELERY_BROKER_URL)
    try:
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception as error:  # kombu and amqp raise many transport error types
        return ServiceState("broker", url, False, first_line(error))
    return ServiceState("broker", url, True)


def check_all() -> list[ServiceState]:
    return [check_database(), check_channel_layer(), check_broker()]


def first_line(error: BaseException) -> str:
    """The first line of an error's text, for one-line log and status messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
