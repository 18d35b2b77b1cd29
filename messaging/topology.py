"""The RabbitMQ topology: every exchange and queue the project uses, declared in one place.

Everything else imports names from here. `declare_topology` is run by `manage.py setup_broker`,
by `make run` and by every Celery worker on start-up; `topology_differences` backs
`manage.py setup_broker --check`.

The dead-letter exchange is a topic exchange that keeps each message's original routing key,
so a later queue can bind to a subset; the `dead_letters` queue binds `#` to keep everything.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from amqp.exceptions import NotFound, PreconditionFailed
from kombu import Connection, Exchange, Queue

CHAT_EVENTS_EXCHANGE = Exchange("chat_events", type="topic", durable=True)
DEAD_LETTER_EXCHANGE = Exchange("dead_letter", type="topic", durable=True)

# Every work queue names the DLX: a task that fails for good is rejected without requeue and
# lands here instead of looping or vanishing.
WORK_QUEUE_ARGUMENTS = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name}

# BROKER_QUEUE_TYPE: "classic" on one node (the default), "quorum" on a cluster (docs/scaling.md).
BROKER_QUEUE_TYPES = ("classic", "quorum")
# A quorum queue dead-letters a message itself once it has been delivered this many times without
# an ack: a message that kills every worker that takes it (requeued by
# CELERY_TASK_REJECT_ON_WORKER_LOST) ends in the dead letters instead of looping. Celery's own
# retries publish a new message, so they do not count towards it.
QUORUM_DELIVERY_LIMIT = 5
QUORUM_WORK_QUEUE_ARGUMENTS = {
    **WORK_QUEUE_ARGUMENTS,
    "x-queue-type": "quorum",
    "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
    # A dead letter stays in its queue until the dead-letter queue has confirmed it; classic
    # queues (and quorum's default, at-most-once) drop it when that move fails. RabbitMQ needs
    # reject-publish for it: a full queue refuses new messages instead of dropping the oldest.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}

ANALYTICS_QUEUE_NAME = "analytics"
MONITORING_QUEUE_NAME = "monitoring"
DEAD_LETTER_QUEUE_NAME = "dead_letters"

# The periodic alert check (monitoring/tasks.py) has a queue and a worker of its own
# (Procfile `monitor`), so it still runs, and reports, when the analytics workers are gone.
MONITORING_EXCHANGE = Exchange("monitoring", type="direct", durable=True)


def work_queue_arguments(*, queue_type: str) -> dict[str, object]:
    """The arguments every work queue (analytics, monitoring) is declared with for `queue_type`."""
    if queue_type == "classic":
        return dict(WORK_QUEUE_ARGUMENTS)
    if queue_type == "quorum":
        return dict(QUORUM_WORK_QUEUE_ARGUMENTS)
    raise ValueError(f"BROKER_QUEUE_TYPE must be one of {BROKER_QUEUE_TYPES}, not {queue_type!r}")


def work_queues(*, queue_type: str) -> tuple[Queue, ...]:
    """The analytics and monitoring queues as BROKER_QUEUE_TYPE wants them."""
    arguments = work_queue_arguments(queue_type=queue_type)
    return (
        Queue(
            ANALYTICS_QUEUE_NAME,
            exchange=CHAT_EVENTS_EXCHANGE,
            # Every chat.message.* event (messaging.events.MESSAGE_CREATED is the one today).
            routing_key="chat.message.*",
            durable=True,
            queue_arguments=arguments,
        ),
        Queue(
            MONITORING_QUEUE_NAME,
            exchange=MONITORING_EXCHANGE,
            routing_key="monitoring",
            durable=True,
            queue_arguments=arguments,
        ),
    )


def dead_letter_queue(*, queue_type: str) -> Queue:
    """The dead-letter queue as BROKER_QUEUE_TYPE wants it: on a cluster it is replicated too, or
    losing one node would lose the letters the work queues kept so carefully."""
    work_queue_arguments(queue_type=queue_type)  # the same check of the setting
    return Queue(
        DEAD_LETTER_QUEUE_NAME,
        exchange=DEAD_LETTER_EXCHANGE,
        routing_key="#",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"} if queue_type == "quorum" else None,
    )


# The classic declarations, for code that needs a queue's name, exchange or routing key (these
# do not depend on the type); anything that declares queues goes through `declared_queues`.
ANALYTICS_QUEUE, MONITORING_QUEUE = work_queues(queue_type="classic")
DEAD_LETTER_QUEUE = dead_letter_queue(queue_type="classic")
WORK_QUEUES: tuple[Queue, ...] = (ANALYTICS_QUEUE, MONITORING_QUEUE)
EXCHANGES: tuple[Exchange, ...] = (CHAT_EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE, MONITORING_EXCHANGE)
QUEUES: tuple[Queue, ...] = (*WORK_QUEUES, DEAD_LETTER_QUEUE)

# Mention notifications (chat/notifications.py) caused by a VIP's message jump this queue, at the
# priorities messaging.events declares. Small on purpose: a classic queue keeps one internal queue
# per level. Changing it later means deleting the queue (PRECONDITION_FAILED otherwise), hence
# some room above the two levels used.
NOTIFICATIONS_MAX_PRIORITY = 10
NOTIFICATIONS_QUEUE_TYPES = ("classic", "quorum")
NOTIFICATIONS_QUEUE_NAME = "notifications"


def notifications_queue(*, queue_type: str) -> Queue:
    """The notifications queue as the setting NOTIFICATIONS_QUEUE_TYPE wants it.

    classic (default, RabbitMQ 3.x): strict priorities via `x-max-priority`; the worker always
    gets the highest-priority ready message. quorum: replicated, but RabbitMQ before 4.0 ignores
    priorities on it (plain FIFO: VIP work waits behind the backlog), and from 4.0 it has two
    levels (5 and up is high) served about 2:1 high:normal, not strictly; no `x-max-priority`.
    """
    # messaging.events names this module's queues, so it is imported here, not at the top.
    from messaging.events import MENTION

    if queue_type == "classic":
        arguments = {**WORK_QUEUE_ARGUMENTS, "x-max-priority": NOTIFICATIONS_MAX_PRIORITY}
    elif queue_type == "quorum":
        arguments = {**WORK_QUEUE_ARGUMENTS, "x-queue-type": "quorum"}
    else:
        raise ValueError(
            f"NOTIFICATIONS_QUEUE_TYPE must be one of {NOTIFICATIONS_QUEUE_TYPES}, not {queue_type!r}"
        )
    return Queue(
        NOTIFICATIONS_QUEUE_NAME,
        exchange=CHAT_EVENTS_EXCHANGE,
        routing_key=MENTION.routing_key,
        durable=True,
        queue_arguments=arguments,
    )


def declared_queues() -> tuple[Queue, ...]:
    """Every queue as the settings BROKER_QUEUE_TYPE and NOTIFICATIONS_QUEUE_TYPE want it (read
    late, so a test's override counts): the work queues, the dead letters, the notifications."""
    from django.conf import settings

    return (
        *work_queues(queue_type=settings.BROKER_QUEUE_TYPE),
        dead_letter_queue(queue_type=settings.BROKER_QUEUE_TYPE),
        notifications_queue(queue_type=settings.NOTIFICATIONS_QUEUE_TYPE),
    )


def declare_topology(connection: Connection) -> None:
    """Declare every exchange, queue and binding; idempotent, safe to run on every start-up.

    Raises amqp's PreconditionFailed when an entity exists with other arguments (see
    `topology_differences` for a readable report).
    """
    channel = connection.channel()
    try:
        for exchange in EXCHANGES:
            exchange.bind(channel).declare()
        for queue in declared_queues():
            # Declares the queue's exchange, the queue and the binding.
            queue.bind(channel).declare()
    finally:
        channel.close()


@dataclass(frozen=True)
class TopologyDifference:
    kind: str  # "exchange" or "queue"
    name: str
    problem: str
    migration: str

    def explain(self) -> str:
        return f"{self.kind} {self.name} {self.problem}: {self.migration}"


def topology_differences(connection: Connection) -> list[TopologyDifference]:
    """Compare the broker's entities with this module's; an empty list means they match.

    Never creates anything that is missing: each entity is first declared passively, and only
    an existing one is redeclared with the expected arguments, which RabbitMQ answers with
    PRECONDITION_FAILED when they differ. Either error closes the channel, so each entity
    gets a fresh one. Bindings cannot be listed over AMQP; setup_broker re-creates them.
    """
    vhost = connection.virtual_host or "/"
    vhost_flag = "" if vhost == "/" else f" -p {vhost}"
    differences: list[TopologyDifference] = []

    for exchange in EXCHANGES:
        try:
            _on_fresh_channel(
                connection, lambda ch, e=exchange: ch.exchange_declare(e.name, e.type, passive=True)
            )
        except NotFound:
            differences.append(
                TopologyDifference("exchange", exchange.name, "is missing", "run `manage.py setup_broker`")
            )
            continue
        try:
            _on_fresh_channel(connection, lambda ch, e=exchange: e.bind(ch).declare())
        except PreconditionFailed as error:
            differences.append(
                TopologyDifference(
                    "exchange",
                    exchange.name,
                    f"exists with other arguments ({_reply_text(error)})",
                    f"delete it (`rabbitmqadmin{vhost_flag and ' -V ' + vhost} delete exchange "
                    f"name={exchange.name}` or the management UI), then run `manage.py setup_broker`",
                )
            )

    for queue in declared_queues():
        try:
            _on_fresh_channel(connection, lambda ch, q=queue: ch.queue_declare(q.name, passive=True))
        except NotFound:
            differences.append(
                TopologyDifference("queue", queue.name, "is missing", "run `manage.py setup_broker`")
            )
            continue
        try:
            _on_fresh_channel(connection, lambda ch, q=queue: q.bind(ch).queue_declare())
        except PreconditionFailed as error:
            differences.append(
                TopologyDifference(
                    "queue",
                    queue.name,
                    f"exists with other arguments ({_reply_text(error)})",
                    f"drain it, delete it with `rabbitmqctl delete_queue{vhost_flag} {queue.name}`, "
                    "then run `manage.py setup_broker`",
                )
            )
    return differences


def _on_fresh_channel(connection: Connection, declare) -> None:
    channel = connection.channel()
    try:
        declare(channel)
    finally:
        # A channel error has already closed it on the broker's side; closing again is harmless.
        try:
            channel.close()
        except Exception:  # the channel is unusable either way
            pass


def _reply_text(error: Exception) -> str:
    text = getattr(error, "reply_text", "") or str(error)
    return text.removeprefix("PRECONDITION_FAILED - ")


class ScratchVhostError(Exception):
    """rabbitmqctl is missing or refused; the message says which command and why."""


@contextmanager
def scratch_vhost(prefix: str, *, broker_url: str) -> Iterator[str]:
    """A RabbitMQ vhost of the caller's own, with this topology, deleted on exit; yields its URL.

    Benchmarks and test sessions use one each, so their queues never mix with the product's or
    with each other's on a shared broker. `broker_url` may list a cluster's nodes (kombu's
    failover URL); the URL yielded lists them all, each with the new vhost. Needs `rabbitmqctl`
    on this machine; it reaches the broker through the node the setting RABBITMQCTL_NODE names.
    """
    vhost = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = broker_url_with_vhost(broker_url, vhost)
    _rabbitmqctl("add_vhost", vhost)
    try:
        username = urlsplit(broker_url.split(";")[0]).username or "guest"
        _rabbitmqctl("set_permissions", "-p", vhost, username, ".*", ".*", ".*")
        with Connection(url) as connection:
            declare_topology(connection)
        yield url
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def broker_url_with_vhost(broker_url: str, vhost: str) -> str:
    """`broker_url` with `vhost` as its virtual host; each node's, for a failover list (`amqp://a;amqp://b`)."""
    path = "/" + quote(vhost, safe="")
    return ";".join(urlsplit(node)._replace(path=path).geturl() for node in broker_url.split(";"))


def _rabbitmqctl(*args: str) -> None:
    # Vhosts and permissions are cluster-wide: any node of the broker's cluster can create them.
    from django.conf import settings

    node = ["-n", settings.RABBITMQCTL_NODE] if settings.RABBITMQCTL_NODE else []
    command = f"rabbitmqctl {' '.join([*node, args[0]])}"
    try:
        subprocess.run(["rabbitmqctl", "-q", *node, *args], check=True, capture_output=True, timeout=60)
    except FileNotFoundError as error:
        raise ScratchVhostError("rabbitmqctl is not on this machine (needed to create a vhost)") from error
    except subprocess.TimeoutExpired as error:
        raise ScratchVhostError(f"{command} did not answer within {error.timeout:.0f}s") from error
    except subprocess.CalledProcessError as error:
        # The first line says what went wrong (an unreachable node's diagnostics follow it).
        lines = [line.strip() for line in error.stderr.decode(errors="replace").splitlines()]
        detail = next((line for line in lines if line and line != "Error:"), str(error))
        raise ScratchVhostError(f"{command} failed: {detail}") from error
