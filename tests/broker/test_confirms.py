"""The confirming publisher's connection upkeep: heartbeats while idle, dead peers noticed, no hang."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import amqp
import pytest

from bench.procfile import free_port
from messaging.confirms import ConfirmingPublisher, Outgoing
from messaging.connection import BrokerUnavailable
from messaging.topology import CHAT_EVENTS_EXCHANGE
from tests.faults.tcp_proxy import TcpProxy
from tests.harness import wait_until

pytestmark = [pytest.mark.broker]


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(free_port())
    proxy.open()
    yield proxy
    proxy.close()


def proxied_publisher(broker_url: str, proxy: TcpProxy, *, heartbeat: int) -> ConfirmingPublisher:
    url = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    return ConfirmingPublisher(url, return_key=lambda message: "", heartbeat=heartbeat)


def heartbeats_received(publisher: ConfirmingPublisher) -> int:
    publisher.keep_alive()
    return publisher._connection.connection.bytes_recv  # frames read, heartbeats included


def test_idle_publisher_kept_alive_reads_the_brokers_heartbeats_and_stays_connected(broker_url, proxy):
    publisher = proxied_publisher(broker_url, proxy, heartbeat=1)
    publisher.connect()
    try:
        start = heartbeats_received(publisher)

        # Several intervals pass: heartbeats left unread would count as missed and raise.
        wait_until(
            lambda: heartbeats_received(publisher) >= start + 4,
            timeout=60,
            message="no heartbeats from the broker",
        )

        assert publisher.connected
    finally:
        publisher.close()


def test_keep_alive_notices_a_broker_gone_silent(broker_url, proxy):
    publisher = proxied_publisher(broker_url, proxy, heartbeat=1)
    publisher.connect()
    proxy.blackhole()

    with pytest.raises(BrokerUnavailable, match="heartbeats missed"):
        wait_until(publisher.keep_alive, timeout=60, message="the silent broker went unnoticed")

    assert not publisher.connected


def test_keep_alive_notices_a_closed_connection(broker_url, proxy):
    publisher = proxied_publisher(broker_url, proxy, heartbeat=0)
    publisher.connect()
    proxy.close()

    with pytest.raises(BrokerUnavailable, match="closed connection"):
        wait_until(publisher.keep_alive, timeout=60, message="the closed connection went unnoticed")

    assert not publisher.connected


def test_publish_into_a_silent_broker_fails_instead_of_hanging(broker_url, proxy):
    publisher = proxied_publisher(broker_url, proxy, heartbeat=0)
    publisher.connect()
    proxy.blackhole()
    message = amqp.Message("{}", content_type="application/json")

    # The confirms never come; giving up must not wait for a close handshake that cannot come either.
    with pytest.raises(BrokerUnavailable):
        publisher.publish([Outgoing("one", message, CHAT_EVENTS_EXCHANGE.name, "chat.message.created")])

    assert not publisher.connected
