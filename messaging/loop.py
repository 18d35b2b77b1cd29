"""The base of the long-running broker loops (the outbox relay, the dead-letter archiver).

A loop runs until stopped and survives broker and database outages: it connects, does its work,
prunes hourly (and once at start), and waits idle while keeping its broker connection alive with
AMQP heartbeats, so a connection that died silently is replaced before the work needs it. On an
outage it drops what it holds, backs off (0.5 s doubling to MAX_BACKOFF_SECONDS) and connects
again, logging each state change once, never each retry. SIGTERM ends it cleanly
(`stop_on_sigterm`); it closes its connections on the way out.

A loop writes only its own part: `connect`, `broker_node`, `work`, `idle_wait`, `keep_alive`,
`prune`, `close`.
"""

from __future__ import annotations

import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import psycopg2
from django.db import DatabaseError
from django.db import connection as django_connection

from infrastructure.health import first_line, redacted_url
from messaging.connection import BROKER_ERRORS, BrokerUnavailable

logger = logging.getLogger(__name__)

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
PRUNE_EVERY_SECONDS = 3600.0

# What the loop's database work raises when PostgreSQL is gone: the ORM's errors, and the raw
# psycopg2 ones of connections it holds outside the ORM (the relay's LISTEN).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (DatabaseError, psycopg2.Error)


class LoopStopped(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """SIGTERM arrived (stop_on_sigterm)."""


def stop_on_sigterm() -> None:
    """Make SIGTERM raise LoopStopped wherever the loop is.

    Stopping anywhere is safe for both loops: the relay's open transaction rolls back (its rows
    are published again), the archiver's unacked deliveries come back and are archived once.
    """
    signal.signal(signal.SIGTERM, _raise_stopped)


def _raise_stopped(signum: int, frame: object) -> None:
    raise LoopStopped


class LoopState:
    """Logs a loop's state changes (broker and database up or down), each once, not every retry."""

    def __init__(self, *, name: str, waiting: str, broker_url: str) -> None:
        self.name = name
        self.waiting = waiting
        self.url = redacted_url(broker_url)
        self.node = ""  # the node of the connection in use: one of a failover URL's
        self.broker = "starting"  # then "up", "lost" (was up) or "unreachable" (a connect failed)
        self.database = "up"

    def broker_up(self, node: str) -> None:
        if self.broker == "starting":
            logger.info("%s connected to RabbitMQ at %s", self.name, node)
        elif self.broker != "up":
            logger.info("%s reconnected to RabbitMQ at %s", self.name, node)
        self.broker, self.node = "up", node

    def broker_lost(self, error: str) -> None:
        """The connection failed while in use."""
        if self.broker == "up":
            logger.warning(
                "lost the broker connection to %s (%s); %s, the %s reconnects",
                self.node,
                error,
                self.waiting,
                self.name,
            )
        self.broker = "lost"

    def broker_unreachable(self, error: str) -> None:
        """Connecting failed (at start, or a reconnect after the connection was lost)."""
        if self.broker != "unreachable":
            logger.warning(
                "broker unreachable at %s (%s); %s, the %s keeps retrying",
                self.url,
                error,
                self.waiting,
                self.name,
            )
        self.broker = "unreachable"

    def database_up(self) -> None:
        if self.database == "down":
            logger.info("%s reconnected to the database", self.name)
        self.database = "up"

    def database_down(self, error: str) -> None:
        if self.database != "down":
            logger.warning("database unreachable (%s); the %s keeps retrying", error, self.name)
        self.database = "down"


class BrokerLoop(ABC):
    """Runs until `should_stop()`: connect, then work, prune when due and wait idle, round after round.

    Broker errors (BrokerUnavailable or any of BROKER_ERRORS) and database errors (DATABASE_ERRORS)
    from any method end the round: the loop closes what it holds, backs off and connects again.
    """

    name: ClassVar[str]  # in log lines: "relay", "dead-letter archiver"
    waiting: ClassVar[str]  # what an outage leaves waiting: "events wait in the outbox"

    def __init__(self, *, broker_url: str, heartbeat: int, should_stop: Callable[[], bool]) -> None:
        self.broker_url = broker_url
        self.heartbeat = heartbeat  # AMQP heartbeat interval in seconds (0: none); idle_wait drives it
        self.should_stop = should_stop
        self.state = LoopState(name=self.name, waiting=self.waiting, broker_url=broker_url)

    @abstractmethod
    def connect(self) -> None:
        """Open the broker connection (and whatever else the work needs); a no-op for what is open."""

    @abstractmethod
    def broker_node(self) -> str:
        """The node the open broker connection uses (messaging.connection.broker_node)."""

    @abstractmethod
    def work(self) -> bool:
        """One round of work; True when it reached the database (so the database is up)."""

    @abstractmethod
    def idle_wait(self) -> None:
        """Wait for more work, calling `keep_alive` at least every keep-alive interval of `heartbeat`."""

    @abstractmethod
    def keep_alive(self) -> None:
        """Read what the broker sent and send a heartbeat when due; raises on a dead connection."""

    @abstractmethod
    def close(self, *, broken: bool) -> None:
        """Close the connections; `broken`: drop the broker's without the close handshake."""

    @abstractmethod
    def prune(self, *, between_chunks: Callable[[], None]) -> None:
        """Delete what the loop no longer needs, calling `between_chunks` between deletes."""

    def run(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        next_prune = time.monotonic()
        try:
            while not self.should_stop():
                connected = False
                try:
                    self.connect()
                    connected = True
                    self.state.broker_up(self.broker_node())
                    while not self.should_stop():
                        if self.work():
                            self.state.database_up()
                        if time.monotonic() >= next_prune:
                            # The broker hears from us between chunks: a long prune must not look dead.
                            self.prune(between_chunks=self.keep_alive)
                            self.state.database_up()
                            next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
                        backoff = FIRST_BACKOFF_SECONDS
                        self.idle_wait()
                    return
                except (BrokerUnavailable, *BROKER_ERRORS) as error:
                    self.close(broken=True)
                    if connected:
                        self.state.broker_lost(_broker_error(error))
                    else:
                        self.state.broker_unreachable(_broker_error(error))
                except DATABASE_ERRORS as error:
                    self.state.database_down(first_line(error))
                    # Nothing would send heartbeats during the backoff, and closing the broker
                    # connection hands its unacked deliveries back: all reopen with the database.
                    self.close(broken=False)
                    django_connection.close()
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        finally:
            self.close(broken=False)


def _broker_error(error: BaseException) -> str:
    # BrokerUnavailable already holds the first line of its cause.
    return str(error) if isinstance(error, BrokerUnavailable) else first_line(error)
