"""The relay's wake-up: a LISTEN on the outbox channel, and the idle wait that keeps the broker alive.

A trigger NOTIFYs the channel for every outbox INSERT once its transaction commits (messaging/outbox.py),
so the relay publishes within milliseconds instead of at its fallback poll.
"""

from __future__ import annotations

import select
import time

import psycopg2.extensions

from infrastructure.postgres import database_connect_autocommit
from messaging.outbox import OUTBOX_NOTIFY_CHANNEL
from messaging.publishing import EventPublisher


class OutboxListener:
    """A LISTEN on the outbox channel, on its own autocommit psycopg2 connection."""

    def __init__(self) -> None:
        self._connection: psycopg2.extensions.connection | None = None

    def connect(self) -> None:
        if self._connection is not None and not self._connection.closed:
            return
        conn = database_connect_autocommit()
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {OUTBOX_NOTIFY_CHANNEL}")
        self._connection = conn

    def fileno(self) -> int:
        """The database socket, for select(): readable when a NOTIFY (or an error) arrived."""
        assert self._connection is not None
        return self._connection.fileno()

    def notified(self) -> bool:
        """Read what PostgreSQL sent; True when it held a NOTIFY. Raises psycopg2.Error."""
        assert self._connection is not None
        self._connection.poll()
        notified = bool(self._connection.notifies)
        self._connection.notifies.clear()
        return notified

    def wait(self, timeout: float) -> bool:
        """Block until a NOTIFY arrives or `timeout` passes; True when notified."""
        self.connect()
        readable, _, _ = select.select([self], [], [], timeout)
        return bool(readable) and self.notified()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None


def events_wait(*, seconds: float, listener: OutboxListener, publisher: EventPublisher) -> bool:
    """The idle relay's sleep: until a NOTIFY or `seconds` pass, keeping the broker connection alive.

    Wakes at least every `publisher.keep_alive_seconds` for its heartbeats, and whenever the broker
    sends something, so a dead or closed broker connection is noticed while idle. Returns True
    when notified; raises BrokerUnavailable (connection closed) or psycopg2.Error.
    """
    listener.connect()
    deadline = time.monotonic() + seconds
    while True:
        publisher.keep_alive()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        watched: list[OutboxListener | EventPublisher] = [listener]
        if publisher.connected:
            watched.append(publisher)
        tick = publisher.keep_alive_seconds
        readable, _, _ = select.select(watched, [], [], min(remaining, tick) if tick else remaining)
        if listener in readable and listener.notified():
            return True
