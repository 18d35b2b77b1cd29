"""Moving queues onto the arguments messaging/topology.py wants now (`manage.py migrate_queues`).

RabbitMQ can neither change a queue's type or arguments nor rename a queue. So for each queue
whose arguments differ (`queue_inspect`, what `setup_broker --check` reports), with its consumers
stopped and the relay free to go on publishing:

  1. declare the holding queue (`migration_holding_queue`: the wanted arguments, bound like the
     queue), so that whatever is published from now on lands there too;
  2. unbind the queue: from now on, only there;
  3. move the queue's messages to the holding queue;
  4. delete the queue once it is empty;
  5-8. the same the other way: declare the queue anew (wanted arguments, its bindings), unbind the
     holding queue, move its messages to the queue, delete it once empty.

Moving a message: basic.get from the source, publish a copy straight into the destination queue
(the default exchange, mandatory) with publisher confirms, and ack the source only once the copy
is confirmed, so a crash or a lost broker never loses one. The copy keeps the body byte for byte
and every property and header (priority, expiration, x-death, ...), except `x-delivery-count`,
which a quorum queue writes on each delivery: it counts the move's own gets, and the new queue
counts its deliveries afresh (so the poison-message limit starts again). An `expiration` is
copied as it was published, since RabbitMQ tells nobody how long a message has waited: its clock
starts again at the move, so a message can outlive its TTL by the time it had already waited
(the notifier drops a notification past its `expires_at` itself, so none is delivered late).
Order is kept within what is moved, not around it: messages published during the move may be
delivered before older ones.

Restartable: every step is idempotent and the state lives in the broker (which of the queue and
its holding queue exist, and whether the queue has the wanted arguments), so a run that stopped
anywhere finishes when run again, losing nothing. Two things can deliver a message twice, and
every consumer here is idempotent by id (the ledgers), so it is processed once:
- a crash between a batch's confirms and its ack: the batch is back in the source and its copies
  are in the destination, so it is moved again (at most BATCH_SIZE messages); no broker operation
  can ack one queue and publish to another atomically (RabbitMQ's transactions are not atomic
  across queues, so one broken off mid-commit could lose the message instead);
- a message published in the moment between steps 1 and 2 (or 5 and 6) reaches both queues:
  unbinding first would leave a moment with no queue bound, and dead letters routed then would be
  dropped. One broker round trip; a crash just there stretches it until the next run.

The queue's bindings are unbound as topology.py declares them: AMQP cannot list a queue's
bindings. Should an older version have bound it with a key it no longer declares, messages keep
arriving through that key; they are moved too, and the queue is deleted the moment it is empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import amqp
from amqp.exceptions import AMQPNotImplementedError, PreconditionFailed
from kombu import Connection, Queue

from infrastructure.faults import fault_point
from messaging.confirms import ConfirmingPublisher, Outgoing
from messaging.connection import broker_close, broker_connect, broker_connection
from messaging.topology import (
    EXCHANGES,
    declare_topology,
    declared_queues,
    migration_holding_queue,
    queue_bindings,
    queue_inspect,
)

# Messages per publish-and-confirm round, and the most a crash between confirm and ack can
# move twice.
BATCH_SIZE = 200
# How long a move waits for the next delivery before it takes the source queue for empty (and
# checks by deleting it only if it is).
GATHER_IDLE_SECONDS = 0.2
# A header quorum queues add on each delivery; it describes the move's gets, not the message.
DELIVERY_COUNT_HEADER = "x-delivery-count"
# The two moves of a queue, as fault points name them: `queue_migration.out.after_confirm`.
MOVE_OUT = "out"
MOVE_BACK = "back"


class QueueMigrationError(Exception):
    """The migration cannot start or go on; the message is one sentence saying why and what to do."""


@dataclass(frozen=True)
class QueueMigrationPlan:
    """What `queues_migrate` will do to one queue, from the broker's state now."""

    queue: str
    holding: str
    difference: str | None  # RabbitMQ's reply on the arguments; None when only moving back is left
    wanted: dict[str, object]  # the queue's arguments once migrated
    messages: int  # in the queue
    held: int  # in the holding queue, from a run that stopped
    consumers: dict[str, int]  # queue name -> consumers, where there are any
    steps: tuple[str, ...]
    declaration: Queue = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, object]:
        return {key: value for key, value in asdict(self).items() if key != "declaration"}


@dataclass
class QueueMigrationResult:
    queue: str
    wanted: dict[str, object]
    moved_out: int = 0  # messages moved from the queue to the holding queue
    moved_back: int = 0  # from the holding queue to the queue: those and what was published meanwhile
    seconds: float = 0.0


StepReport = Callable[[str, str], None]  # (queue, what was done)
MoveReport = Callable[[str, str, int, int], None]  # (source, destination, moved so far, to move)


def queue_migration_plan(connection: Connection, queue: Queue) -> QueueMigrationPlan | None:
    """What migrating `queue` takes now; None when it has the wanted arguments and no holding
    queue is left."""
    holding = migration_holding_queue(queue)
    state = queue_inspect(connection, queue)
    held = queue_inspect(connection, holding)
    if state.difference is None and not held.exists:
        return None
    steps: list[str] = []
    if state.difference is not None:
        steps += [
            f"declare {holding.name} with the wanted arguments, bound like {queue.name}",
            f"unbind {queue.name}",
            f"move its {state.messages} messages to {holding.name}",
            f"delete {queue.name} once empty",
        ]
    steps += [
        f"declare {queue.name} with the wanted arguments and bindings",
        f"unbind {holding.name}",
        f"move its messages ({held.messages} now) to {queue.name}",
        f"delete {holding.name} once empty",
    ]
    return QueueMigrationPlan(
        queue=queue.name,
        holding=holding.name,
        difference=state.difference,
        wanted=dict(queue.queue_arguments or {}),
        messages=state.messages,
        held=held.messages,
        consumers={
            name: n for name, n in ((queue.name, state.consumers), (holding.name, held.consumers)) if n
        },
        steps=tuple(steps),
        declaration=queue,
    )


def queue_migration_plans(connection: Connection) -> list[QueueMigrationPlan]:
    """A plan for every declared queue that differs or has a holding queue left, in
    `declared_queues` order."""
    return [plan for queue in declared_queues() if (plan := queue_migration_plan(connection, queue))]


def queues_migrate(
    *,
    broker_url: str,
    batch_size: int = BATCH_SIZE,
    on_step: StepReport | None = None,
    on_moved: MoveReport | None = None,
) -> list[QueueMigrationResult]:
    """Migrate every queue `queue_migration_plans` names, one after the other, then declare the
    whole topology (queues nobody had yet, every binding).

    Changes nothing when any of those queues has consumers (QueueMigrationError). Raises
    BrokerUnavailable when the broker fails or refuses; running it again continues.
    """
    with broker_connection(broker_url) as connection, ConfirmingPublisher(broker_url) as publisher:
        for exchange in EXCHANGES:
            exchange.bind(connection.default_channel).declare()
        plans = queue_migration_plans(connection)
        _refuse_consumers(plans)
        results = []
        for plan in plans:
            result = queue_migrate(
                broker_url=broker_url,
                connection=connection,
                publisher=publisher,
                queue=plan.declaration,
                batch_size=batch_size,
                on_step=on_step or _ignore,
                on_moved=on_moved or _ignore,
            )
            if result is not None:
                results.append(result)
        declare_topology(connection)
    return results


def queue_migrate(
    *,
    broker_url: str,
    connection: Connection,
    publisher: ConfirmingPublisher,
    queue: Queue,
    batch_size: int = BATCH_SIZE,
    on_step: StepReport,
    on_moved: MoveReport,
) -> QueueMigrationResult | None:
    """Move `queue` onto its wanted arguments, from whatever step a previous run stopped at;
    None when there was nothing to do."""
    plan = queue_migration_plan(connection, queue)
    if plan is None:
        return None
    _refuse_consumers([plan])
    started = time.monotonic()
    result = QueueMigrationResult(queue.name, plan.wanted)
    holding = migration_holding_queue(queue)
    channel = connection.channel()
    # The body exactly as published, whatever its content_encoding claims.
    channel.auto_decode = False
    move = _QueueMove(
        broker_url=broker_url, channel=channel, publisher=publisher, batch_size=batch_size, on_moved=on_moved
    )
    if plan.difference is not None:
        on_step(queue.name, f"differs: {plan.difference}")
        result.moved_out = move.run(
            queue=queue.name, source=queue, destination=holding, phase=MOVE_OUT, on_step=on_step
        )
    result.moved_back = move.run(
        queue=queue.name, source=holding, destination=queue, phase=MOVE_BACK, on_step=on_step
    )
    result.seconds = time.monotonic() - started
    channel.close()
    return result


@dataclass
class _QueueMove:
    broker_url: str
    channel: amqp.Channel
    publisher: ConfirmingPublisher
    batch_size: int
    on_moved: MoveReport

    def run(self, *, queue: str, source: Queue, destination: Queue, phase: str, on_step: StepReport) -> int:
        """Steps 1-4 (or 5-8): bind `destination`, unbind `source`, move, delete `source`; returns
        how many messages were moved. `source` and `destination` are bound the same way."""
        destination.bind(self.channel).declare()
        on_step(queue, f"declared {destination.name}, bound like {source.name}")
        fault_point(f"queue_migration.{phase}.after_destination_bound")
        for exchange, routing_key, arguments in queue_bindings(source):
            self.channel.queue_unbind(source.name, exchange, routing_key, arguments=arguments)
        on_step(queue, f"unbound {source.name}: what is published now goes to {destination.name}")
        fault_point(f"queue_migration.{phase}.after_source_unbound")
        moved = 0
        while True:
            moved += self._messages_move(source=source.name, destination=destination.name, phase=phase)
            if _queue_delete_once_empty(self.broker_url, source.name):
                break
        on_step(queue, f"moved {moved} messages to {destination.name} and deleted {source.name}")
        fault_point(f"queue_migration.{phase}.after_source_deleted")
        return moved

    def _messages_move(self, *, source: str, destination: str, phase: str) -> int:
        """Move what `source` holds now, a confirmed batch at a time; returns how many.

        Consumes rather than polls: on a quorum queue basic.get costs a consensus round per
        message, ten times slower. Prefetch holds one batch: the next arrives as this one is acked.
        """
        _, total, _ = self.channel.queue_declare(source, passive=True)
        delivered: list[amqp.Message] = []
        self.channel.basic_qos(0, self.batch_size, False)
        consumer_tag = self.channel.basic_consume(source, callback=delivered.append, no_ack=False)
        moved = 0
        while self._gathered(delivered):
            moved += self._batch_move(delivered, source=source, destination=destination, phase=phase)
            self.on_moved(source, destination, moved, max(total, moved))
        # What arrived before the cancel's answer is moved too; the rest stays in `source`.
        self.channel.basic_cancel(consumer_tag)
        if delivered:
            moved += self._batch_move(delivered, source=source, destination=destination, phase=phase)
        return moved

    def _gathered(self, delivered: list[amqp.Message]) -> bool:
        """Wait for a full batch, or until none arrived for a while; False when none did. The
        queue is then empty, or slow to deliver: deleting it checks which."""
        try:
            while len(delivered) < self.batch_size:
                self.channel.connection.drain_events(timeout=GATHER_IDLE_SECONDS)
        except TimeoutError:
            pass
        return bool(delivered)

    def _batch_move(self, delivered: list[amqp.Message], *, source: str, destination: str, phase: str) -> int:
        """Publish copies of the delivered messages, then ack them once confirmed; empties
        `delivered` and returns how many were moved."""
        batch = list(delivered)
        delivered.clear()
        failed = self.publisher.publish(
            [Outgoing(m.delivery_tag, _message_copy(m), "", destination) for m in batch]
        )
        fault_point(f"queue_migration.{phase}.after_confirm")
        if failed:
            for message in batch:
                if message.delivery_tag not in failed:
                    self.channel.basic_ack(message.delivery_tag)
            # The others go back to `source` when the channel closes.
            raise QueueMigrationError(
                f"{len(failed)} messages could not be moved from {source} to {destination} "
                f"({next(iter(failed.values()))}); they are still in {source}: run migrate_queues again"
            )
        self.channel.basic_ack(batch[-1].delivery_tag, multiple=True)
        fault_point(f"queue_migration.{phase}.after_batch")
        return len(batch)


def _message_copy(message: amqp.Message) -> amqp.Message:
    properties = dict(message.properties)
    headers = properties.get("application_headers")
    if headers and DELIVERY_COUNT_HEADER in headers:
        properties["application_headers"] = {k: v for k, v in headers.items() if k != DELIVERY_COUNT_HEADER}
    return amqp.Message(message.body, **properties)


def _queue_delete_once_empty(broker_url: str, name: str) -> bool:
    """Delete queue `name` if it holds no message and has no consumer; False when it does.

    On a connection of its own: quorum queues answer the if-empty and if-unused flags with a
    connection error (NOT_IMPLEMENTED). Then the count decides; the queue is unbound and nobody
    consumes it, so nothing can arrive between the count and the delete.
    """
    connection = broker_connect(broker_url)
    try:
        try:
            connection.channel().queue_delete(name, if_unused=True, if_empty=True)
            return True
        except PreconditionFailed:
            return False
        except AMQPNotImplementedError:
            broker_close(connection)
            connection = broker_connect(broker_url)
        channel = connection.channel()
        _, messages, consumers = channel.queue_declare(name, passive=True)
        if messages or consumers:
            return False
        channel.queue_delete(name)
        return True
    finally:
        broker_close(connection)


def _refuse_consumers(plans: list[QueueMigrationPlan]) -> None:
    busy = {name: n for plan in plans for name, n in plan.consumers.items()}
    if busy:
        listed = ", ".join(f"{name} has {n} consumer{'s' if n != 1 else ''}" for name, n in busy.items())
        raise QueueMigrationError(
            f"migrate_queues changes nothing while a queue it moves has consumers ({listed}): "
            "stop them and run it again"
        )


def _ignore(*_args: object) -> None:
    pass
