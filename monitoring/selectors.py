"""Reads behind the metrics and the alert checks: outbox and dead-letter backlogs, open sockets,
queue depth from RabbitMQ, alert states. Each source is read with a short timeout; callers decide
what an unreachable source means."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from amqp.exceptions import NotFound
from django.apps import apps
from django.conf import settings
from django.db.models import Count, Min
from django.db.models.functions import Coalesce
from django.utils import timezone
from kombu import Queue

from messaging.connection import BrokerUnavailable, broker_connection
from messaging.models import OutboxEvent
from monitoring.models import AlertLevel, AlertState, QueueSample

# The alerts (dead letters, queues without consumers or draining too slowly) tell what the broker
# status page and the dead letters do, so they are shown to the staff who may view those.
ALERTS_PERMISSION = "deadletters.view_deadletter"


def user_sees_alerts(*, user: Any) -> bool:
    """Whether the alert banner and the alert socket are for `user` (a logged-in staff member allowed
    to view dead letters)."""
    return bool(user.is_authenticated and user.is_staff and user.has_perm(ALERTS_PERMISSION))


class SourceUnavailable(Exception):
    """A backing service (RabbitMQ, Redis) did not answer within the timeout."""


@dataclass(frozen=True)
class OutboxBacklog:
    pending: int
    oldest_age_seconds: float  # 0 when nothing is pending


# Counting stops here: while the relay is down the backlog can reach millions of rows, and a
# scrape must stay cheap; the gauge then reads "at least this many".
OUTBOX_COUNT_CAP = 100_000


def outbox_backlog(*, now: datetime | None = None) -> OutboxBacklog:
    """Events written but not yet confirmed by the broker (the relay's lag), count capped.

    Both reads walk the partial index of pending rows (`outbox_pending_idx`, by id), so they cost
    the same with a huge history of sent rows; the oldest by id is the oldest written.
    """
    now = now or timezone.now()
    pending = OutboxEvent.objects.filter(sent_at__isnull=True).order_by("id")
    count = pending[:OUTBOX_COUNT_CAP].count()
    oldest = pending.values_list("created_at", flat=True).first()
    return OutboxBacklog(count, max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)


@dataclass(frozen=True)
class DeadLetterBacklog:
    by_status: dict[str, int]
    unresolved: int  # status "new": nobody replayed or discarded them yet
    oldest_unresolved_age_seconds: float  # 0 when none is unresolved


def dead_letter_backlog(*, now: datetime | None = None) -> DeadLetterBacklog | None:
    """Dead letters by status, and the age of the oldest unresolved one; None without the app."""
    if not apps.is_installed("deadletters"):
        return None
    DeadLetter = apps.get_model("deadletters", "DeadLetter")
    now = now or timezone.now()
    by_status = {status: 0 for status in DeadLetter.Status.values}
    for row in DeadLetter.objects.values("status").annotate(n=Count("id")).order_by():
        by_status[row["status"]] = row["n"]
    oldest = DeadLetter.objects.filter(status=DeadLetter.Status.NEW).aggregate(
        # RabbitMQ's own first death time when the message carried one, else when it was archived.
        oldest=Min(Coalesce("first_death_at", "archived_at"))
    )["oldest"]
    return DeadLetterBacklog(
        by_status=by_status,
        unresolved=by_status[DeadLetter.Status.NEW],
        oldest_unresolved_age_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
    )


def open_socket_count() -> int:
    """Sockets open in every web process, from the presence sets in Redis (chat/presence.py).

    Each socket is a member of its user's set, refreshed by a heartbeat; members older than the
    TTL belong to crashed processes and are not counted. Raises SourceUnavailable.
    """
    from chat.presence import key_prefix

    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=settings.METRICS_SOURCE_TIMEOUT_SECONDS,
        socket_connect_timeout=settings.METRICS_SOURCE_TIMEOUT_SECONDS,
    )
    try:
        fresh_since = time.time() - settings.PRESENCE_TTL_SECONDS
        keys = list(client.scan_iter(match=f"{key_prefix()}*", count=500))
        if not keys:
            return 0
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.zcount(key, fresh_since, "+inf")
        return sum(pipe.execute())
    except redis.RedisError as error:
        raise SourceUnavailable(f"Redis: {error}") from error
    finally:
        client.close()


@dataclass(frozen=True)
class QueueStat:
    name: str
    exists: bool
    messages: int  # ready for delivery (RabbitMQ's passive declare does not count unacked ones)
    consumers: int


def queue_stats(*, queues: tuple[Queue, ...], broker_url: str | None = None) -> list[QueueStat]:
    """Depth and consumer count of each queue by passive declares; never creates a queue.

    Through the first node of a cluster's failover URL that answers (messaging.connection).
    Connect, read and write all time out after METRICS_SOURCE_TIMEOUT_SECONDS, so a scrape or a
    check never hangs on a stuck broker. Raises SourceUnavailable.
    """
    timeout = settings.METRICS_SOURCE_TIMEOUT_SECONDS
    stats: list[QueueStat] = []
    try:
        with broker_connection(
            broker_url or settings.CELERY_BROKER_URL, connect_timeout=timeout, socket_timeout=timeout
        ) as connection:
            for queue in queues:
                # A passive declare of a missing queue closes the channel: one channel per queue.
                channel = connection.channel()
                try:
                    _, messages, consumers = channel.queue_declare(queue.name, passive=True)
                    stats.append(QueueStat(queue.name, True, messages, consumers))
                except NotFound:
                    stats.append(QueueStat(queue.name, False, 0, 0))
                finally:
                    try:
                        channel.close()
                    except Exception:  # already closed by the broker after NotFound
                        pass
    except BrokerUnavailable as error:
        raise SourceUnavailable(f"RabbitMQ: {error}") from error
    return stats


def queue_depth_then(*, queue: str, since: datetime) -> QueueSample | None:
    """The oldest sample of `queue` taken at or after `since` (the start of the rate window)."""
    return QueueSample.objects.filter(queue=queue, sampled_at__gte=since).order_by("sampled_at").first()


def alert_states() -> list[AlertState]:
    return list(AlertState.objects.all())


def active_alerts() -> list[AlertState]:
    """Alerts at WARNING or CRITICAL, the most severe first (the staff banner, the admin)."""
    return list(AlertState.objects.filter(level__gt=AlertLevel.OK).order_by("-level", "changed_at"))
