"""RabbitMQ connections that fail over across a cluster's nodes and neither hang nor die unnoticed.

Every broker client of the project connects through here, so each fails over the same way and can
name the node it uses: the confirming publisher (messaging/confirms.py: the relay, dead-letter
replay), the dead-letter archiver, setup_broker, and the queue reads behind the metrics, the
alerts, `queues` and the broker status page. Celery's workers fail over by themselves (kombu, with
the same failover URL). No socket read or write waits longer than SOCKET_TIMEOUT_SECONDS, and a
connection that failed is dropped without the AMQP close handshake, which would only wait on it.

py-amqp neither reads the broker's heartbeats nor sends its own by itself: a client that asks for
heartbeats calls `broker_keep_alive` at least every `keep_alive_interval(heartbeat)` while idle,
or a peer gone without FIN or RST (a network partition) goes unnoticed until it next uses the
connection, and the broker closes a connection whose heartbeats stopped.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager

import amqp
from amqp.exceptions import AMQPError, RecoverableConnectionError
from amqp.exceptions import ConnectionError as AMQPConnectionError
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError

from infrastructure.health import broker_nodes, first_line, redacted_url

CONNECT_TIMEOUT_SECONDS = 3.0
# No read or write on the broker socket waits longer: a peer gone silent must not hang a declare,
# a close handshake or a publish into a full send buffer forever (py-amqp's default is no limit).
SOCKET_TIMEOUT_SECONDS = 10.0
# kombu's heartbeat_check `rate`: keep-alive runs this many times per heartbeat interval and sends
# a heartbeat when half an interval passed without traffic, well before the broker's two missed.
HEARTBEAT_CHECKS_PER_INTERVAL = 2
# Keep-alive reads a frame only once select() saw bytes; a frame cut in two waits no longer.
FRAME_READ_TIMEOUT_SECONDS = 0.05

# Everything that means "the broker connection is unusable": reconnect and try again later.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes socket.timeout and ConnectionRefusedError
    AMQPConnectionError,
    RecoverableConnectionError,
    AMQPError,
    KombuOperationalError,
)


class BrokerUnavailable(Exception):
    """The broker cannot be reached or stopped answering; the connection was dropped."""


def broker_connect(
    broker_url: str,
    *,
    heartbeat: int = 0,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    socket_timeout: float = SOCKET_TIMEOUT_SECONDS,
) -> Connection:
    """Open a connection whose socket reads and writes time out; raises BrokerUnavailable.

    `broker_url` may list a cluster's nodes as kombu's failover URL (`amqp://a;amqp://b`): each
    node is tried once, in the listed order, and the first that answers is used (`broker_node`
    names it); BrokerUnavailable means none did, and says why for each. A caller's own backoff
    decides when to go round again. `heartbeat` (seconds, 0 for none) asks the broker for AMQP
    heartbeats: whoever sets it must call `broker_keep_alive` at least every
    `keep_alive_interval(heartbeat)` while idle.
    """
    nodes = broker_nodes(broker_url)
    failures: list[str] = []
    for node in nodes:
        connection = Connection(node, connect_timeout=connect_timeout, heartbeat=heartbeat)
        try:
            connection.ensure_connection(max_retries=0)
            # py-amqp restores this after every read that has a timeout of its own.
            connection.connection.sock.settimeout(socket_timeout)
        except BROKER_ERRORS as error:
            broker_drop(connection)
            failures.append(
                first_line(error) if len(nodes) == 1 else f"{redacted_url(node)}: {first_line(error)}"
            )
            continue
        return connection
    raise BrokerUnavailable("; ".join(failures))


@contextmanager
def broker_connection(
    broker_url: str,
    *,
    heartbeat: int = 0,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    socket_timeout: float = SOCKET_TIMEOUT_SECONDS,
) -> Iterator[Connection]:
    """A `with` block's connection (see broker_connect, which also picks the node); raises
    BrokerUnavailable.

    A broker error ending the block drops the connection at once and comes out as
    BrokerUnavailable; any other end closes it with the AMQP handshake (bounded by the socket
    timeout), which hands its unacked deliveries back to RabbitMQ without waiting for a timeout.
    """
    connection = broker_connect(
        broker_url, heartbeat=heartbeat, connect_timeout=connect_timeout, socket_timeout=socket_timeout
    )
    try:
        yield connection
    except BROKER_ERRORS as error:
        broker_drop(connection)
        raise BrokerUnavailable(first_line(error)) from error
    except BaseException:
        broker_close(connection)
        raise
    broker_close(connection)


def broker_node(connection: Connection) -> str:
    """The node a connected Connection uses, as a URL without its password (for logs and pages)."""
    return redacted_url(connection.as_uri(include_password=True))


def keep_alive_interval(heartbeat: int) -> float | None:
    """How often `broker_keep_alive` must run while idle; None without heartbeats."""
    return heartbeat / HEARTBEAT_CHECKS_PER_INTERVAL if heartbeat else None


def broker_keep_alive(connection: Connection) -> None:
    """Called while idle: read what the broker sent, and send a heartbeat when one is due.

    What is read is dispatched as usual (a delivery reaches its consumer's callback). Raises one
    of BROKER_ERRORS when the broker closed the connection, or sent nothing, not even a heartbeat,
    for two heartbeat intervals: a peer gone without FIN or RST.
    """
    amqp_connection: amqp.Connection = connection.connection
    # A heartbeat counts as received only once read: unread, it would look missed.
    while select.select([amqp_connection.sock], [], [], 0)[0]:
        try:
            amqp_connection.blocking_read(timeout=FRAME_READ_TIMEOUT_SECONDS)
        except TimeoutError:
            break  # half a frame so far: py-amqp keeps it, the rest is read next time
    connection.heartbeat_check(rate=HEARTBEAT_CHECKS_PER_INTERVAL)


def broker_close(connection: Connection) -> None:
    """Close with the AMQP close handshake (bounded by SOCKET_TIMEOUT_SECONDS)."""
    try:
        connection.release()
    except Exception:  # a dead connection fails to close in many ways; it is gone either way
        broker_drop(connection)


def broker_drop(connection: Connection) -> None:
    """Close a broken connection's socket at once, with no AMQP close handshake."""
    try:
        connection.collect()
    except Exception:  # the socket is closed or was never opened; nothing else to free
        pass
