"""Publishing with pipelined publisher confirms: a message counts as sent only once RabbitMQ said so.

Used by the outbox relay (messaging/relay.py), by dead-letter replay (deadletters) and by
`migrate_queues` (messaging/queue_migration.py).
A batch is published, then one wait covers all its confirms, instead of a round trip per
message, which would cap publishing at one broker round trip per event. Messages go out
`mandatory`, so an unroutable one comes back (basic.return, sent before its ack) instead of
being confirmed and silently dropped.

A long-lived publisher (the relay) asks for AMQP heartbeats and calls `keep_alive` while idle;
its connection is kept by messaging/connection.py (timeouts, heartbeats, dropping a broken one).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import amqp
from kombu import Connection

from infrastructure.health import first_line
from messaging.connection import (
    BROKER_ERRORS,
    BrokerUnavailable,
    broker_close,
    broker_connect,
    broker_drop,
    broker_keep_alive,
    broker_node,
    keep_alive_interval,
)

logger = logging.getLogger(__name__)

CONFIRM_TIMEOUT_SECONDS = 10.0

NACKED = "the broker refused the message (nack)"
# What a publisher without `return_key` records for a returned message: it fails every message.
_UNKNOWN_RETURN = object()
UNROUTABLE = "no queue is bound for its exchange and routing key"


@dataclass(frozen=True)
class Outgoing:
    key: Hashable  # the caller's name for this message; `return_key` finds it in a returned copy
    message: amqp.Message
    exchange: str
    routing_key: str


class ConfirmingPublisher:
    """One broker connection with a confirm-mode channel, opened on first use and after a failure.

    `return_key` reads an Outgoing's key back from a returned message (a header or property
    the caller set); without one, a returned message cannot be told from the others, so a return
    fails the whole batch. `on_connect` runs on every new connection (e.g. declaring the topology).
    `heartbeat` (seconds, 0 for none) asks the broker for AMQP heartbeats; whoever sets it must
    call `keep_alive` at least every `keep_alive_seconds` while not publishing.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        return_key: Callable[[amqp.Message], Hashable] | None = None,
        on_connect: Callable[[Connection], None] | None = None,
        heartbeat: int = 0,
    ) -> None:
        self.broker_url = broker_url
        self.heartbeat = heartbeat
        self._return_key = return_key
        self._on_connect = on_connect
        self._connection: Connection | None = None
        self._channel: amqp.Channel | None = None
        self._published = 0  # delivery tags number a channel's publishes from 1
        self._unconfirmed: set[int] = set()
        self._nacked: set[int] = set()
        self._returned: set[Hashable] = set()

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def connect(self) -> None:
        """Open the connection and a confirm-mode channel; raises BrokerUnavailable."""
        if self._channel is not None:
            return
        connection = broker_connect(self.broker_url, heartbeat=self.heartbeat)
        try:
            if self._on_connect is not None:
                self._on_connect(connection)
            channel: amqp.Channel = connection.default_channel
            channel.confirm_select()
        except BROKER_ERRORS as error:
            broker_drop(connection)
            raise BrokerUnavailable(first_line(error)) from error
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._connection, self._channel, self._published = connection, channel, 0

    def publish(self, batch: Sequence[Outgoing]) -> dict[Hashable, str]:
        """Publish the batch, then wait for every confirm; returns {key: why} for the ones not taken.

        A timeout or a lost connection raises BrokerUnavailable and closes the connection, since
        late confirms could not be told apart from the next batch's.
        """
        self.connect()
        assert self._channel is not None and self._connection is not None
        self._unconfirmed.clear()
        self._nacked.clear()
        self._returned.clear()
        tags: dict[int, Outgoing] = {}
        try:
            for outgoing in batch:
                self._channel.basic_publish(
                    outgoing.message,
                    exchange=outgoing.exchange,
                    routing_key=outgoing.routing_key,
                    mandatory=True,
                )
                self._published += 1
                tags[self._published] = outgoing
                self._unconfirmed.add(self._published)
            deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS
            while self._unconfirmed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("publisher confirms did not arrive in time")
                self._connection.connection.drain_events(timeout=remaining)
        except BROKER_ERRORS as error:
            self._forget()
            raise BrokerUnavailable(first_line(error)) from error
        failed: dict[Hashable, str] = {}
        for tag, outgoing in tags.items():
            if outgoing.key in self._returned or _UNKNOWN_RETURN in self._returned:
                failed[outgoing.key] = UNROUTABLE
            elif tag in self._nacked:
                failed[outgoing.key] = NACKED
        if failed:
            # Counted by reason: a nack (a queue refusing) and a return (a missing binding) call
            # for different fixes, and the caller only sees which messages it got back.
            logger.warning(
                "%s refused %d of %d messages: %s",
                self.node,
                len(failed),
                len(batch),
                "; ".join(f"{count} {reason}" for reason, count in Counter(failed.values()).items()),
            )
        if self._nacked:
            # A channel keeps its per-queue enqueuer state: one that a quorum queue rejected while
            # it had no leader (its node just died) goes on nacking every publish on that channel
            # after a new leader is elected. The next batch goes out on a new channel.
            self.close()
        return failed

    @property
    def keep_alive_seconds(self) -> float | None:
        """How often `keep_alive` must run while idle; None without heartbeats."""
        return keep_alive_interval(self.heartbeat)

    @property
    def node(self) -> str:
        """The node this publisher's connection uses (one of a failover URL's). Only while connected."""
        assert self._connection is not None
        return broker_node(self._connection)

    def fileno(self) -> int:
        """The broker socket, for select(): readable when the broker sent something (a heartbeat,
        a close) or went away. Only while connected."""
        assert self._connection is not None
        return self._connection.connection.sock.fileno()

    def keep_alive(self) -> None:
        """Called while idle: read what the broker sent, and send a heartbeat when one is due.

        Raises BrokerUnavailable (and closes the connection) when the broker closed it, or sent
        nothing, not even a heartbeat, for two heartbeat intervals: a peer gone without FIN or RST.
        A no-op when not connected.
        """
        if self._connection is None:
            return
        try:
            broker_keep_alive(self._connection)
        except BROKER_ERRORS as error:
            self._forget()
            raise BrokerUnavailable(first_line(error)) from error

    def close(self) -> None:
        """Close the connection with the AMQP close handshake (bounded by SOCKET_TIMEOUT_SECONDS)."""
        if self._connection is not None:
            broker_close(self._connection)
        self._connection = self._channel = None

    def _forget(self) -> None:
        # After an error the connection is broken: a close handshake would only wait on it.
        if self._connection is not None:
            broker_drop(self._connection)
        self._connection = self._channel = None

    def __enter__(self) -> ConfirmingPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _settle(self, delivery_tag: int, multiple: bool) -> set[int]:
        # `multiple` confirms every outstanding tag up to and including this one.
        settled = {tag for tag in self._unconfirmed if tag <= delivery_tag} if multiple else {delivery_tag}
        self._unconfirmed -= settled
        return settled

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked |= self._settle(delivery_tag, multiple)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        self._returned.add(self._return_key(message) if self._return_key else _UNKNOWN_RETURN)
