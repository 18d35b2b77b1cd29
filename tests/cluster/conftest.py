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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import procfile
from bench.procfile import port_open
from messaging.connection import broker_connection
from messaging.topology import declare_topology
from tests.harness import Processes

CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq-cluster" / "cluster.sh"
# pytest-timeout counts fixtures in: whichever cluster test runs first (pytest-django runs database
# tests first) also waits for the session's cluster to start (cluster.sh, up to 300 s), and in
# test_node_down.py for node 1 to stop. An upper bound for a stuck test, never a performance claim.
FIRST_CLUSTER_TEST_TIMEOUT = pytest.mark.timeout(480)
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
    prefix: str
    directory: str

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

    def failover_url(self, vhost: str = "/") -> str:
        """CELERY_BROKER_URL for this cluster: every node, kombu's failover list, node 1 first."""
        return ";".join(node.url(vhost) for node in self.nodes)

    def management_urls(self) -> str:
        """RABBITMQ_MANAGEMENT_URL for this cluster: each node's, in the order of `failover_url`."""
        return ";".join(f"http://localhost:{node.management_port}" for node in self.nodes)

    def running_nodes(self, *, asking: int) -> list[str]:
        status = json.loads(self.ctl("cluster_status", "--formatter", "json", node=asking))
        return sorted(status["running_nodes"])

    @contextmanager
    def node_stopped(self, index: int) -> Iterator[None]:
        """Node `index` stopped (`rabbitmqctl stop_app`: its clients' connections are closed, its
        queues' leadership moves to the others), then started again, with the whole cluster running
        and its AMQP port answering before the test goes on: other tests share the cluster."""
        self.ctl("stop_app", node=index)
        try:
            yield
        finally:
            try:
                self.ctl("start_app", node=index)
            except subprocess.CalledProcessError:
                # A start that failed half-way (a listener it could not open) leaves applications
                # running that the next start refuses to find: stop them, then start once more.
                self.ctl("stop_app", node=index)
                self.ctl("start_app", node=index)
            other = (index + 1) % len(self.nodes)
            procfile.wait_until(
                lambda: (
                    self.running_nodes(asking=other) == sorted(node.name for node in self.nodes)
                    and port_open(self.nodes[index].amqp_port)()
                ),
                timeout=120,
                message=f"{self.nodes[index].name} did not rejoin the cluster",
            )

    def start_node(self, node: int) -> subprocess.Popen:
        """Start a stopped or killed node again (cluster.sh start-node), in the background: it keeps
        its data and rejoins the cluster. `wait()` for it; 0 means it has booted."""
        return subprocess.Popen(
            [
                str(CLUSTER_SCRIPT),
                "start-node",
                str(node + 1),
                *("--prefix", self.prefix, "--dir", self.directory),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def restore(self) -> None:
        """Three running nodes again, whatever a test left: start a killed or stopped node, and wait
        for a paused or restarting one."""
        for node in range(len(self.nodes)):
            if (
                subprocess.run(
                    ["rabbitmqctl", "-q", "-n", self.nodes[node].name, "ping"],
                    capture_output=True,
                    timeout=60,
                ).returncode
                != 0
            ):
                self.start_node(node).wait(timeout=300)
        for node in range(len(self.nodes)):
            self.ctl("await_startup", "--timeout", "120", node=node)

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


def _first_ephemeral_port() -> int:
    """Where the kernel starts picking local ports for outgoing connections."""
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def _free_base_port() -> int:
    """A base port whose nine cluster ports are free now (a race with another process stays
    possible; cluster.sh then fails with the node's log named).

    Below the kernel's ephemeral range: while a test has a node stopped, an outgoing connection
    from anywhere on the machine could otherwise take one of its ports, and the node could not
    listen again when started.
    """
    low, high = 20000, _first_ephemeral_port() - 30
    for _ in range(100):
        base = random.randrange(low, high, 100)
        if _ports_free(base):
            return base
    raise RuntimeError(f"no free block of ports for a RabbitMQ cluster between {low} and {high}")


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
            ),
            prefix=prefix,
            directory=cluster_dir,
        )
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", *options], capture_output=True, timeout=300)


@contextmanager
def new_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """An empty vhost on the cluster (created through node 1, seen by all), deleted on exit."""
    vhost = f"test_{uuid.uuid4().hex[:8]}"
    rabbit_cluster.ctl("add_vhost", vhost)
    rabbit_cluster.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        rabbit_cluster.ctl("delete_vhost", vhost)


@pytest.fixture
def cluster_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """An empty vhost of this test's own on the cluster."""
    with new_vhost(rabbit_cluster) as vhost:
        yield vhost


@pytest.fixture
def cluster_processes(
    transactional_db, rabbit_cluster: RabbitCluster, cluster_vhost: str, settings, tmp_path: Path
) -> Iterator[Processes]:
    """The Procfile's processes (tests/harness.py) on this test's vhost of the cluster, given its
    failover URL (node 1 first), with the work and dead-letter queues replicated
    (BROKER_QUEUE_TYPE=quorum) and the topology declared through node 1."""
    url = rabbit_cluster.failover_url(cluster_vhost)
    settings.CELERY_BROKER_URL = url
    settings.BROKER_QUEUE_TYPE = "quorum"
    with broker_connection(rabbit_cluster.nodes[0].url(cluster_vhost)) as connection:
        declare_topology(connection)
    started = Processes(broker_url=url, log_dir=tmp_path, env={"BROKER_QUEUE_TYPE": "quorum"})
    yield started
    started.kill_all()
