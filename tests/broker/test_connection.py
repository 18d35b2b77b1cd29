"""broker_connect with a cluster's failover URL (`amqp://a;amqp://b`): a dead node is skipped."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from bench.procfile import free_port
from messaging.connection import BrokerUnavailable, broker_close, broker_connect, broker_node


def _node_url(broker_url: str, port: int) -> str:
    parts = urlsplit(broker_url)
    return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()


def test_failover_url_connects_to_the_next_node_when_the_first_refuses(broker_url):
    dead, live = _node_url(broker_url, free_port()), _node_url(broker_url, urlsplit(broker_url).port or 5672)

    connection = broker_connect(f"{dead};{live}")
    try:
        assert connection.connected
        assert broker_node(connection) == live.replace(f":{urlsplit(live).password}@", ":***@")
    finally:
        broker_close(connection)


def test_failover_url_with_every_node_down_raises_broker_unavailable_saying_why_for_each(broker_url):
    ports = [free_port() for _ in range(3)]

    with pytest.raises(BrokerUnavailable) as unavailable:
        broker_connect(";".join(_node_url(broker_url, port) for port in ports))

    reasons = str(unavailable.value).split("; ")
    assert [reason.split("@127.0.0.1:")[1].split("/")[0] for reason in reasons] == [str(p) for p in ports]
    assert all("Connection refused" in reason and ":***@" in reason for reason in reasons)
