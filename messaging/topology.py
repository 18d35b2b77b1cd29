"""The RabbitMQ topology: every exchange and queue the project uses, declared in one place.

Everything else imports names from here. `declare_topology` is run by `manage.py setup_broker`,
by `make run` and by every Celery worker on start-up; `topology_differences` backs
`manage.py setup_broker --check`; `migration_holding_queue` names the queue
`manage.py migrate_queues` (messaging/queue_migration.py) keeps a queue's messages in while it
declares the queue anew.

The dead-letter exchange is a topic exchange that keeps each message's original routing key,
so a later queue can bind to a subset; the `dead_letters` queue binds `#` to keep everything.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

from amqp.exceptions import NotFound, PreconditionFailed
from kombu import Connection, Exchange, Queue

from infrastructure.health import broker_nodes

if TYPE_CHECKING:
    from messaging.events import EventType

T = TypeVar("T")

logger = logging.getLogger(__name__)

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

# Mention notifications (chat/notifications.py) wait in two queues, one per event type in
# messaging.events: a VIP's mentions have a queue and a notifier process of their own (Procfile
# `notifier_vip`), so however many normal mentions are queued, none stands in front of a VIP's.
# Priorities would do it on one queue, but only on classic queues before RabbitMQ 4.0 (4.0's
# quorum queues serve two levels about 2:1, not strictly); two queues work on either type, so
# the notifications follow BROKER_QUEUE_TYPE like every other work queue.
NOTIFICATIONS_QUEUE_NAME = "notifications"
VIP_NOTIFICATIONS_QUEUE_NAME = "notifications_vip"


def notifications_queues(*, queue_type: str) -> tuple[Queue, Queue]:
    """The normal and the VIP notifications queues as BROKER_QUEUE_TYPE wants them: work queues
    like analytics (dead-letter exchange; on quorum the delivery limit and at-least-once
    dead-lettering), each bound to its event's routing key. Expired notifications (the relay's
    per-message TTL) are dead-lettered with reason "expired" on either type."""
    # messaging.events names this module's queues, so it is imported here, not at the top.
    from messaging.events import MENTION, VIP_MENTION

    arguments = work_queue_arguments(queue_type=queue_type)

    def bound_to(event: EventType[Any]) -> Queue:
        return Queue(
            event.queue_name,
            exchange=CHAT_EVENTS_EXCHANGE,
            routing_key=event.routing_key,
            durable=True,
            queue_arguments=arguments,
        )

    return bound_to(MENTION), bound_to(VIP_MENTION)


def declared_queues() -> tuple[Queue, ...]:
    """Every queue as the setting BROKER_QUEUE_TYPE wants it (read late, so a test's override
    counts): the work queues, the dead letters, the notifications."""
    from django.conf import settings

    return (
        *work_queues(queue_type=settings.BROKER_QUEUE_TYPE),
        dead_letter_queue(queue_type=settings.BROKER_QUEUE_TYPE),
        *notifications_queues(queue_type=settings.BROKER_QUEUE_TYPE),
    )


def declare_topology(connection: Connection) -> list[str]:
    """Declare every exchange, queue and binding; idempotent, safe to run on every start-up.

    Returns (and logs) why each queue it could not declare could not: on a cluster, a classic
    queue lives on one node, and while that node is down RabbitMQ answers NOT_FOUND for it. The
    rest is declared all the same, so that the relay, the archiver and the workers go on with
    the queues that live on. Raises amqp's PreconditionFailed when an entity exists with other
    arguments (see `topology_differences` for a readable report).
    """
    unavailable: list[str] = []
    channel = connection.channel()
    try:
        for exchange in EXCHANGES:
            exchange.bind(channel).declare()
        for queue in declared_queues():
            try:
                # Declares the queue's exchange, the queue and the binding.
                queue.bind(channel).declare()
            except NotFound as error:
                unavailable.append(f"queue {queue.name} is unavailable ({_reply_text(error)})")
                logger.warning("%s; it comes back with its node", unavailable[-1])
                channel = connection.channel()  # the error closed the channel
    finally:
        channel.close()
    return unavailable


# RabbitMQ cannot change a queue's arguments or name: `manage.py migrate_queues` moves a queue's
# messages to this other name, declares the queue anew, and moves them back.
MIGRATION_HOLDING_SUFFIX = ".migrating"


def migration_holding_queue(queue: Queue) -> Queue:
    """Where `queue`'s messages wait while `queue` is declared anew: its name plus
    MIGRATION_HOLDING_SUFFIX, with the arguments and bindings `queue` is declared with."""
    holding = copy.copy(queue)
    holding.name = f"{queue.name}{MIGRATION_HOLDING_SUFFIX}"
    return holding


def queue_bindings(queue: Queue) -> list[tuple[str, str, dict | None]]:
    """`queue`'s bindings as (exchange, routing key, arguments), whichever way it declares them."""
    if queue.bindings:
        return [(b.exchange.name, b.routing_key, b.arguments) for b in queue.bindings]
    if queue.exchange is not None and queue.exchange.name:
        return [(queue.exchange.name, queue.routing_key, queue.binding_arguments)]
    return []


@dataclass(frozen=True)
class QueueState:
    """A queue on the broker, compared with its declaration here."""

    exists: bool
    messages: int = 0  # ready, not counting those delivered and not yet acked
    consumers: int = 0
    difference: str | None = None  # RabbitMQ's reply when it exists with other arguments


def queue_inspect(connection: Connection, queue: Queue) -> QueueState:
    """`queue` as the broker has it; never creates it.

    It is first declared passively, and only an existing one is redeclared with this module's
    arguments, which RabbitMQ answers with PRECONDITION_FAILED when they differ. Either error
    closes the channel, so each declare gets a fresh one.
    """
    try:
        _, messages, consumers = _on_fresh_channel(
            connection, lambda ch: ch.queue_declare(queue.name, passive=True)
        )
    except NotFound:
        return QueueState(exists=False)
    try:
        _on_fresh_channel(connection, lambda ch: queue.bind(ch).queue_declare())
    except PreconditionFailed as error:
        return QueueState(True, messages, consumers, _reply_text(error))
    return QueueState(True, messages, consumers)


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

    Never creates anything that is missing (see `queue_inspect`). A holding queue left by an
    unfinished `migrate_queues` counts as a difference too: it is bound like its queue, so it
    would keep a copy of every message. Bindings cannot be listed over AMQP; setup_broker
    re-creates them.
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
        state = queue_inspect(connection, queue)
        if not state.exists:
            differences.append(
                TopologyDifference("queue", queue.name, "is missing", "run `manage.py setup_broker`")
            )
        elif state.difference is not None:
            differences.append(
                TopologyDifference(
                    "queue",
                    queue.name,
                    f"exists with other arguments ({state.difference})",
                    "stop its consumers, then run `manage.py migrate_queues`: it declares the queue "
                    f"anew and moves its {state.messages} messages over (docs/scaling.md)",
                )
            )
        holding = migration_holding_queue(queue)
        if queue_inspect(connection, holding).exists:
            differences.append(
                TopologyDifference(
                    "queue",
                    holding.name,
                    "is left from an unfinished migration",
                    "run `manage.py migrate_queues` again to finish it",
                )
            )
    return differences


def _on_fresh_channel(connection: Connection, declare: Callable[[Any], T]) -> T:
    channel = connection.channel()
    try:
        return declare(channel)
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
def scratch_vhost(prefix: str, *, broker_url: str, rabbitmq_nodes: Sequence[str] = ()) -> Iterator[str]:
    """A RabbitMQ vhost of the caller's own, with this topology, deleted on exit; yields its URL.

    Benchmarks and test sessions use one each, so their queues never mix with the product's or
    with each other's on a shared broker. Needs `rabbitmqctl` on this machine. `broker_url` may
    name several nodes (`amqp://a;amqp://b`): each gets the vhost. `rabbitmq_nodes` are the
    names of a cluster's nodes for rabbitmqctl, each tried in turn (so the vhost is still deleted
    after one of them was lost); without them, the node the setting RABBITMQCTL_NODE names, else
    rabbitmqctl's default node.
    """
    vhost = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = broker_url_with_vhost(broker_url, vhost)
    username = urlsplit(broker_nodes(broker_url)[0]).username or "guest"
    _rabbitmqctl("add_vhost", vhost, nodes=rabbitmq_nodes)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, username, ".*", ".*", ".*", nodes=rabbitmq_nodes)
        with Connection(url) as connection:
            declare_topology(connection)
        yield url
    finally:
        _rabbitmqctl("delete_vhost", vhost, nodes=rabbitmq_nodes)


def broker_url_with_vhost(broker_url: str, vhost: str) -> str:
    """`broker_url` (one node, or several separated by `;`) with every node's vhost set to `vhost`."""
    return ";".join(
        urlsplit(node_url)._replace(path="/" + quote(vhost, safe="")).geturl()
        for node_url in broker_nodes(broker_url)
    )


# Deleting a vhost deletes its quorum queues one by one; with a cluster node down, RabbitMQ tries
# each for seconds before it force-deletes it, minutes for the 30-odd a Celery worker declares.
RABBITMQCTL_TIMEOUT_SECONDS = 600


def _rabbitmqctl(*args: str, nodes: Sequence[str]) -> None:
    # Vhosts and permissions are cluster-wide: any node of the broker's cluster can create them.
    from django.conf import settings

    error_text = ""
    for node in nodes or [settings.RABBITMQCTL_NODE or None]:
        try:
            subprocess.run(
                ["rabbitmqctl", "-q", *(["-n", node] if node else []), *args],
                check=True,
                capture_output=True,
                timeout=RABBITMQCTL_TIMEOUT_SECONDS,
            )
            return
        except FileNotFoundError as error:
            raise ScratchVhostError(
                "rabbitmqctl is not on this machine (needed to create a vhost)"
            ) from error
        except subprocess.CalledProcessError as error:
            # The first line says what went wrong (an unreachable node's diagnostics follow it).
            lines = [line.strip() for line in error.stderr.decode(errors="replace").splitlines()]
            error_text = next((line for line in lines if line and line != "Error:"), str(error))
        except subprocess.TimeoutExpired:
            error_text = f"no answer from {node or 'the default node'} in {RABBITMQCTL_TIMEOUT_SECONDS}s"
    raise ScratchVhostError(f"rabbitmqctl {args[0]} failed: {error_text}")
