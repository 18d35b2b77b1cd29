"""The broker-loop base (messaging/loop.py) with a scripted loop: no broker or database needed."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from django.db import OperationalError

from messaging import loop as loop_module
from messaging.connection import BrokerUnavailable
from messaging.loop import BrokerLoop, LoopState


class ScriptedLoop(BrokerLoop):
    """Raises the scripted error of each call in turn (None: succeeds); stops after `rounds` works."""

    name = "scripted loop"
    waiting = "work waits"

    def __init__(self, *, connects: list[Exception | None], works: list[Exception | None]) -> None:
        super().__init__(broker_url="amqp://guest:secret@localhost//", heartbeat=0, should_stop=self.done)
        self.connects, self.works = connects, works
        self.calls: list[str] = []

    def done(self) -> bool:
        return not self.works

    def connect(self) -> None:
        self.calls.append("connect")
        if error := self.connects.pop(0):
            raise error

    def broker_node(self) -> str:
        return "amqp://guest:***@localhost//"

    def work(self) -> bool:
        self.calls.append("work")
        if error := self.works.pop(0):
            raise error
        return True

    def idle_wait(self) -> None:
        self.calls.append("wait")

    def keep_alive(self) -> None:
        self.calls.append("keep_alive")

    def prune(self, *, between_chunks: Callable[[], None]) -> None:
        self.calls.append("prune")
        between_chunks()

    def close(self, *, broken: bool) -> None:
        self.calls.append("drop" if broken else "close")


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(loop_module.time, "sleep", slept.append)
    return slept


def test_loop_backs_off_while_the_broker_is_unreachable_then_works_prunes_and_closes(sleeps, caplog):
    unreachable = BrokerUnavailable("Connection refused")
    loop = ScriptedLoop(connects=[unreachable, unreachable, unreachable, None], works=[None, None])

    with caplog.at_level(logging.INFO, logger="messaging.loop"):
        loop.run()

    assert sleeps == [0.5, 1.0, 2.0]
    assert loop.calls == [
        *["connect", "drop"] * 3,
        *["connect", "work", "prune", "keep_alive", "wait", "work", "wait", "close"],
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "broker unreachable at amqp://guest:***@localhost// (Connection refused); work waits, "
        "the scripted loop keeps retrying",
        "scripted loop reconnected to RabbitMQ at amqp://guest:***@localhost//",
    ]


def test_loop_reconnects_after_a_lost_broker_and_a_lost_database(sleeps, caplog):
    lost = BrokerUnavailable("Too many heartbeats missed")
    database_gone = OperationalError("server closed the connection unexpectedly\nmore detail")
    loop = ScriptedLoop(connects=[None, None, None], works=[None, lost, database_gone, None])

    with caplog.at_level(logging.INFO, logger="messaging.loop"):
        loop.run()

    assert sleeps == [0.5, 1.0]  # no round worked between the two outages: the backoff doubles
    assert loop.calls.count("drop") == 1  # the broken broker connection, without the handshake
    assert loop.calls.count("close") == 2  # for the database outage, and on the way out
    assert [r.getMessage() for r in caplog.records] == [
        "scripted loop connected to RabbitMQ at amqp://guest:***@localhost//",
        "lost the broker connection to amqp://guest:***@localhost// (Too many heartbeats missed); "
        "work waits, the scripted loop reconnects",
        "scripted loop reconnected to RabbitMQ at amqp://guest:***@localhost//",
        "database unreachable (server closed the connection unexpectedly); the scripted loop keeps retrying",
        "scripted loop reconnected to the database",
    ]


def test_loop_state_logs_a_failed_reconnect_once_after_the_loss(caplog):
    state = LoopState(name="relay", waiting="events wait in the outbox", broker_url="amqp://localhost//")

    with caplog.at_level(logging.INFO, logger="messaging.loop"):
        state.broker_up("amqp://localhost//")
        state.broker_lost("Connection reset")
        for _ in range(3):
            state.broker_unreachable("timed out")
        state.broker_up("amqp://localhost//")

    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "relay connected to RabbitMQ at amqp://localhost//",
        "lost the broker connection to amqp://localhost//",
        "broker unreachable at amqp://localhost//",
        "relay reconnected to RabbitMQ at amqp://localhost//",
    ]


def test_loop_state_names_the_node_of_a_failover_url():
    state = LoopState(name="relay", waiting="events wait", broker_url="amqp://a//;amqp://b//;amqp://c//")
    state.broker_up("amqp://b//")
    state.broker_lost("Connection reset")

    assert state.node == "amqp://b//"
