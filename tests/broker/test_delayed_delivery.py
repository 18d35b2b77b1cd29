"""messaging/delayed_delivery.py: Celery's native delayed delivery is declared through the node the
worker's consumer is connected to, never through the failover URL's other nodes (stock Celery tries
each, a dead one for seconds, before the worker consumes again)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from kombu import Connection

from chatproject.celery import app
from messaging.delayed_delivery import NodeDelayedDelivery
from messaging.topology import declare_topology
from messaging.worker_intake import DeadLetteringIntake

pytestmark = pytest.mark.broker


class CountingListener:
    """A TCP port that accepts connections, counts them and closes them: a node that is not RabbitMQ."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            peer.close()


@pytest.fixture
def other_node() -> Iterator[CountingListener]:
    listener = CountingListener()
    yield listener
    listener.sock.close()


def test_the_consumer_runs_node_delayed_delivery_instead_of_celerys():
    steps = DeadLetteringIntake.Blueprint.default_steps

    assert "messaging.delayed_delivery:NodeDelayedDelivery" in steps
    assert "celery.worker.consumer.delayed_delivery:DelayedDelivery" not in steps


def test_delayed_delivery_is_declared_through_the_connected_node_only(scratch_broker_url, other_node):
    failover_url = f"amqp://guest:guest@127.0.0.1:{other_node.port}//;{scratch_broker_url}"
    previous = app.conf.broker_url
    app.conf.broker_url = failover_url
    try:
        with Connection(scratch_broker_url) as connection:
            declare_topology(connection)
            connection.ensure_connection(max_retries=1)
            consumer = SimpleNamespace(app=app, connection=connection)
            NodeDelayedDelivery(consumer).start(consumer)

            # The delayed messages' way back: Celery's delivery exchange exists, bound to chat_events.
            connection.default_channel.exchange_declare("celery_delayed_delivery", "topic", passive=True)
    finally:
        app.conf.broker_url = previous

    assert other_node.accepted == 0
