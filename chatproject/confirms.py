"""Publishing with pipelined publisher confirms: a message counts as sent only once RabbitMQ said so.

Used by the outbox relay (chat/relay.py) and by dead-letter replay (chatproject/deadletters).
A batch is published, then one wait covers all its confirms, instead of a round trip per
message (per-message confirms are five times slower, docs/performance.md). Messages go out
`mandatory`, so an unroutable one comes back (basic.return, sent before its ack) instead of
being confirmed and silently dropped.

A long-lived publisher (the relay) asks for AMQP heartbeats and calls `keep_alive` while idle:
py-amqp neither reads the broker's heartbeats nor sends its own by itself, so without those calls
a peer gone without FIN or RST (a network partition) would go unnoticed until the next publish.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import amqp
from amqp.exceptions import AMQPError, RecoverableConnectionError
from amqp.exceptions import ConnectionError as AMQPConnectionError
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError

CONFIRM_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 3.0
# No read or write on the broker socket waits longer: a peer gone silent must not hang a declare,
# a close handshake or a publish into a full send buffer forever (py-amqp's default is no limit).
SOCKET_TIMEOUT_SECONDS = 10.0
# kombu's heartbeat_check `rate`: keep_alive runs this many times per heartbeat interval and sends
# a heartbeat when half an interval passed without traffic, well before the broker's two missed.
HEARTBEAT_CHECKS_PER_INTERVAL = 2
# keep_alive reads a frame only once select() saw bytes; a frame cut in two waits no longer.
FRAME_READ_TIMEOUT_SECONDS = 0.05

# Everything that means "the broker connection is unusable": reconnect and try again later.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes socket.timeout and ConnectionRefusedError
    AMQPConnectionError,
    RecoverableConnectionError,
    AMQPError,
    KombuOperationalError,
)

NACKED = "the broker refused the message (nack)"
UNROUTABLE = "no queue is bound for its exchange and routing key"


class BrokerUnavailable(Exception):
    """The broker cannot be reached or stopped answering; nothing of the batch counts as sent."""


@dataclass(frozen=True)
class Outgoing:
    key: Hashable  # the caller's name for this message; `return_key` finds it in a returned copy
    message: amqp.Message
    exchange: str
    routing_key: str


class ConfirmingPublisher:
    """One broker connection with a confirm-mode channel, opened on first use and after a failure.

    `return_key` reads an Outgoing's key back from a returned message (a header or property
    the caller set); `on_connect` runs on every new connection (e.g. declaring the topology).
    `heartbeat` (seconds, 0 for none) asks the broker for AMQP heartbeats; whoever sets it must
    call `keep_alive` at least every `keep_alive_seconds` while not publishing.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        return_key: Callable[[amqp.Message], Hashable],
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
        connection = Connection(
            self.broker_url, connect_timeout=CONNECT_TIMEOUT_SECONDS, heartbeat=self.heartbeat
        )
        try:
            connection.ensure_connection(max_retries=0)
            # py-amqp restores this after every read that has a timeout of its own.
            connection.connection.sock.settimeout(SOCKET_TIMEOUT_SECONDS)
            if self._on_connect is not None:
                self._on_connect(connection)
            channel: amqp.Channel = connection.default_channel
            channel.confirm_select()
        except BROKER_ERRORS as error:
            _drop(connection)
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
            if outgoing.key in self._returned:
                failed[outgoing.key] = UNROUTABLE
            elif tag in self._nacked:
                failed[outgoing.key] = NACKED
        return failed

    @property
    def keep_alive_seconds(self) -> float | None:
        """How often `keep_alive` must run while idle; None without heartbeats."""
        return self.heartbeat / HEARTBEAT_CHECKS_PER_INTERVAL if self.heartbeat else None

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
        amqp_connection: amqp.Connection = self._connection.connection
        try:
            # A heartbeat counts as received only once read: unread, it would look missed.
            while select.select([amqp_connection.sock], [], [], 0)[0]:
                try:
                    amqp_connection.blocking_read(timeout=FRAME_READ_TIMEOUT_SECONDS)
                except TimeoutError:
                    break  # half a frame so far: py-amqp keeps it, the rest is read next time
            self._connection.heartbeat_check(rate=HEARTBEAT_CHECKS_PER_INTERVAL)
        except BROKER_ERRORS as error:
            self._forget()
            raise BrokerUnavailable(first_line(error)) from error

    def close(self) -> None:
        """Close the connection with the AMQP close handshake (bounded by SOCKET_TIMEOUT_SECONDS)."""
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:  # a dead connection fails to close in many ways; it is gone either way
                _drop(self._connection)
        self._connection = self._channel = None

    def _forget(self) -> None:
        # After an error the connection is broken: a close handshake would only wait on it.
        if self._connection is not None:
            _drop(self._connection)
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
        self._returned.add(self._return_key(message))


def _drop(connection: Connection) -> None:
    """Close a broken connection's socket at once, with no AMQP close handshake."""
    try:
        connection.collect()
    except Exception:  # the socket is closed or was never opened; nothing else to free
        pass


def first_line(error: BaseException) -> str:
    """The first line of an error's text, for one-line log and status messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
