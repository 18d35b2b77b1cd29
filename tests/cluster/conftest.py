"""A three-node RabbitMQ cluster of this test session's own (ops/rabbitmq-cluster/cluster.sh).

Started once per session on free loopback ports with a node-name prefix of this run's own, so
concurrent runs and the machine's single RabbitMQ node never mix; stopped, data and all, at the
end. Needs root and Debian's rabbitmq-server: the nodes run as the rabbitmq user.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq-cluster" / "cluster.sh"
NODE_COUNT = 3
# cluster.sh's layout: node i has AMQP on base+i-1, management on base+10+i-1, distribution on base+20+i-1.
PORT_OFFSETS = (0, 10, 20)


@dataclass(frozen=True)
class ClusterNode:
    name: str
    amqp_port: int
    management_port: int

    def url(self, vhost: str = "/") -> str:
        return f"amqp://guest:guest@localhost:{self.amqp_port}/{urllib.parse.quote(vhost, safe='')}"


@dataclass(frozen=True)
class RabbitCluster:
    nodes: tuple[ClusterNode, ...]

    def url(self, vhost: str = "/") -> str:
        """Every node's URL as kombu's failover list, as CELERY_BROKER_URL names a cluster."""
        return ";".join(node.url(vhost) for node in self.nodes)

    def ctl(self, *args: str, node: int = 0) -> str:
        """rabbitmqctl against one node (Debian's rabbitmqctl runs as the nodes' user, with their cookie)."""
        result = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.nodes[node].name, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result.stdout

    def management_get(self, path: str, *, node: int = 0) -> object:
        """GET /api/<path> from one node's management plugin, as guest."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.nodes[node].management_port}/api/{path}")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


def _ports_free(base: int) -> bool:
    for offset in PORT_OFFSETS:
        for i in range(NODE_COUNT):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", base + offset + i))
                except OSError:
                    return False
    return True


def _free_base_port() -> int:
    """A base port whose nine cluster ports are free now (a race with another process stays
    possible; cluster.sh then fails with the node's log named)."""
    for _ in range(100):
        base = random.randrange(20000, 60000, 100)
        if _ports_free(base):
            return base
    raise RuntimeError("no free block of ports for a RabbitMQ cluster between 20000 and 60000")


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    if os.geteuid() != 0:
        pytest.fail("the cluster tests start RabbitMQ nodes as the rabbitmq user: run them as root")
    base = _free_base_port()
    prefix = f"t{os.getpid()}n"
    # Under /tmp, not pytest's tmp directory: the rabbitmq user must reach it.
    cluster_dir = f"/tmp/rabbitmq-cluster-{prefix}"
    options = ["--prefix", prefix, "--dir", cluster_dir]
    started = subprocess.run(
        [str(CLUSTER_SCRIPT), "start", "--base-port", str(base), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"cluster.sh start failed: {started.stderr.strip() or started.stdout.strip()}")
        yield RabbitCluster(
            tuple(
                ClusterNode(f"{prefix}{i + 1}@localhost", base + i, base + 10 + i) for i in range(NODE_COUNT)
            )
        )
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", *options], capture_output=True, timeout=300)


@pytest.fixture
def cluster_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """An empty vhost of this test's own on the cluster (created through node 1, seen by all)."""
    vhost = f"test_{uuid.uuid4().hex[:8]}"
    rabbit_cluster.ctl("add_vhost", vhost)
    rabbit_cluster.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    rabbit_cluster.ctl("delete_vhost", vhost)
