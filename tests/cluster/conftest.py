"""A three-node RabbitMQ cluster of this test session's own (ops/rabbitmq-cluster/cluster.sh).

Started once per session on free loopback ports with a node-name prefix of this run's own, so
concurrent runs and the machine's single RabbitMQ node never mix; stopped, data and all, at the
end. Needs root and Debian's rabbitmq-server: the nodes run as the rabbitmq user.

Tests that break nodes (test_node_faults.py) kill, restart and cut them off through RabbitCluster,
and leave three running nodes behind: `cluster_broker` restarts whatever a failed test left down.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.management import call_command

from bench import procfile
from bench.procfile import port_open
from tests.harness import Processes, wait_until

CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq-cluster" / "cluster.sh"
# pytest-timeout counts fixtures in: whichever cluster test runs first (pytest-django runs database
# tests first) also waits for the session's cluster to start (cluster.sh, up to 300 s), and in
# test_node_down.py for node 1 to stop. An upper bound for a stuck test, never a performance claim.
FIRST_CLUSTER_TEST_TIMEOUT = pytest.mark.timeout(480)
NODE_COUNT = 3
# cluster.sh's layout: node i has AMQP on base+i-1, management on base+10+i-1, distribution on base+20+i-1.
PORT_OFFSETS = (0, 10, 20)


# An Erlang node name in rabbitmqctl's output ('t123n1@localhost').
NODE_NAME = re.compile(r"[\w-]+@[\w.-]+")
# Cut a node's Erlang distribution links to ~others, and heal them. A node-specific cookie makes
# every handshake between them fail, in both directions, while the CLI tools, which use the node's
# default cookie, still reach it (net_kernel:allow/1 would lock them out for the node's lifetime).
# The cut also starts a process on the node that heals it after ~milliseconds, in case the test
# dies before it does.
RECONNECT_OTHERS = (
    "[erlang:set_cookie(Node, erlang:get_cookie()) || Node <- Others], "
    "[net_kernel:connect_node(Node) || Node <- Others]"
)
HEAL_EVAL = f"Others = [~others], {RECONNECT_OTHERS}, ok."
CUT_OFF_EVAL = f"""
Others = [~others],
[erlang:set_cookie(Node, partitioned_by_test) || Node <- Others],
[erlang:disconnect_node(Node) || Node <- Others],
spawn(fun() -> timer:sleep(~milliseconds), {RECONNECT_OTHERS} end),
ok.
"""


@dataclass(frozen=True)
class ClusterNode:
    name: str
    amqp_port: int
    management_port: int

    def url(self, vhost: str = "/", *, port: int | None = None) -> str:
        """This node's AMQP URL; `port` reaches it through something else (a test's TCP proxy)."""
        return f"amqp://guest:guest@localhost:{port or self.amqp_port}/{urllib.parse.quote(vhost, safe='')}"


@dataclass(frozen=True)
class RabbitCluster:
    nodes: tuple[ClusterNode, ...]
    # cluster.sh's --prefix and --dir: start-node and the nodes' pid files need them.
    prefix: str
    directory: str

    def ctl(self, *args: str, node: int = 0, tool: str = "rabbitmqctl") -> str:
        """rabbitmqctl (or another of the CLI tools) against one node (Debian's tools run as the
        nodes' user, with their cookie)."""
        result = subprocess.run(
            [tool, "-q", "-n", self.nodes[node].name, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result.stdout

    def failover_url(
        self,
        vhost: str = "/",
        *,
        order: Sequence[int] = (0, 1, 2),
        proxy_ports: Mapping[int, int] | None = None,
    ) -> str:
        """kombu's failover URL listing every node in `order` (node 1 first by default); a node in
        `proxy_ports` (node -> port) is reached through a test's TCP proxy on that port."""
        return ";".join(self.nodes[node].url(vhost, port=(proxy_ports or {}).get(node)) for node in order)

    def index(self, name: str) -> int:
        return [node.name for node in self.nodes].index(name)

    def queue_leader(self, vhost: str, queue: str, *, node: int = 0) -> int:
        """The node that leads quorum queue `queue`, as `node` (a running one) knows it now."""
        rows = json.loads(
            self.ctl("list_queues", "-p", vhost, "name", "leader", "--formatter", "json", node=node)
        )
        return self.index(next(row["leader"] for row in rows if row["name"] == queue))

    def queue_messages(self, vhost: str, queue: str, *, node: int = 0) -> int:
        """Messages in `queue`, ready and delivered-but-unacked, as `node` (a running one) knows it."""
        rows = json.loads(
            self.ctl("list_queues", "-p", vhost, "name", "messages", "--formatter", "json", node=node)
        )
        return next(row["messages"] for row in rows if row["name"] == queue)

    def consumer_nodes(self, vhost: str, *, node: int = 0) -> dict[str, list[int]]:
        """Queue -> the node of each of its consumers (where its channel runs), as `node`'s
        management plugin lists them now (a consumer appears within a second, and is gone as soon
        as its channel or its node is)."""
        consumers: dict[str, list[int]] = {}
        try:
            listed = self.management_get(f"consumers/{urllib.parse.quote(vhost, safe='')}", node=node)
        except OSError:
            # Right after a node died the survivors' management API may time out or answer 500:
            # callers poll, so "none seen yet" is the honest answer.
            return consumers
        for consumer in listed:
            # A consumer whose channel is closing is listed without its channel's details.
            channel_node = (consumer.get("channel_details") or {}).get("node")
            if channel_node:
                consumers.setdefault(consumer["queue"]["name"], []).append(self.index(channel_node))
        return consumers

    def connected_nodes(self, node: int) -> set[int]:
        """The cluster nodes `node` has Erlang distribution links to now."""
        linked = NODE_NAME.findall(self.ctl("eval", "nodes().", node=node))
        return {self.index(name) for name in linked if name in {n.name for n in self.nodes}}

    def kill(self, node: int) -> None:
        """SIGKILL the node's Erlang VM (its pid file, written by cluster.sh) and wait until it is gone:
        no shutdown, nothing flushed, its sockets reset, like a host that died."""
        pid = self._pid(node)
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: not _process_exists(pid), timeout=30, message=f"{self.nodes[node].name} outlived SIGKILL"
        )

    def serves(self, node: int) -> bool:
        """The node's AMQP port answers: it runs, and is not paused in a minority."""
        try:
            with socket.create_connection(("127.0.0.1", self.nodes[node].amqp_port), timeout=2):
                return True
        except OSError:
            return False

    def _pid(self, node: int) -> int:
        return int(Path(self.directory, f"node{node + 1}", "pid").read_text())

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

    def cut_off(self, node: int, *, heal_after: float) -> None:
        """Cut the node's distribution links to the others: a network partition with the node on its
        own. `heal` ends it; the node heals itself after `heal_after` seconds should nobody do so."""
        cut = CUT_OFF_EVAL.replace("~milliseconds", str(int(heal_after * 1000)))
        self.ctl("eval", self._with_others(cut, node), node=node)

    def heal(self, node: int) -> None:
        """End `cut_off`: the node connects to the others again."""
        self.ctl("eval", self._with_others(HEAL_EVAL, node), node=node)

    def _with_others(self, snippet: str, node: int) -> str:
        return snippet.replace(
            "~others", ",".join(f"'{other.name}'" for other in self.nodes if other != self.nodes[node])
        )

    def restore(self) -> None:
        """Three running nodes again, whatever a test left: start a killed node, heal a cut-off
        one, and wait for one that is paused or starting. Quick when all three run."""
        for node in range(len(self.nodes)):
            if self.serves(node):
                continue
            if _process_exists(self._pid(node)):
                self.heal(node)
            else:
                assert self.start_node(node).wait(timeout=300) == 0, f"{self.nodes[node].name} did not start"
            self.ctl("await_startup", "--timeout", "120", node=node)

    def management_get(self, path: str, *, node: int = 0) -> object:
        """GET /api/<path> from one node's management plugin, as guest."""
        with self._management(path, node=node) as response:
            return json.load(response)

    def management_send(self, method: str, path: str, body: object = None, *, node: int = 0) -> None:
        """PUT or DELETE /api/<path> on one node's management plugin, as guest: what rabbitmqctl
        does, without starting an Erlang VM for the command (seconds on a busy machine)."""
        with self._management(path, node=node, method=method, body=body):
            pass

    def _management(self, path: str, *, node: int, method: str = "GET", body: object = None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.nodes[node].management_port}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        return urllib.request.urlopen(request, timeout=30)


def _ports_free(base: int) -> bool:
    for offset in PORT_OFFSETS:
        for i in range(NODE_COUNT):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", base + offset + i))
                except OSError:
                    return False
    return True


def _ephemeral_ports_start() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        return int(ports.read().split()[0])


def _free_base_port() -> int:
    """A base port whose nine cluster ports are free now (a race with another process stays
    possible; cluster.sh then fails with the node's log named).

    Below the kernel's ephemeral range: a killed node's port would otherwise be free for any
    outgoing connection on the machine to take as its local port (and keep, in TIME_WAIT, for a
    minute), and the node could not listen on it again when it restarts.
    """
    highest = min(_ephemeral_ports_start(), 60000) - max(PORT_OFFSETS) - NODE_COUNT
    for _ in range(100):
        base = random.randrange(20000, highest, 100)
        if _ports_free(base):
            return base
    raise RuntimeError(f"no free block of ports for a RabbitMQ cluster between 20000 and {highest}")


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
    rabbit_cluster.management_send("PUT", f"vhosts/{vhost}")
    rabbit_cluster.management_send(
        "PUT", f"permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    try:
        yield vhost
    finally:
        rabbit_cluster.management_send("DELETE", f"vhosts/{vhost}")


@pytest.fixture
def cluster_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """An empty vhost of this test's own on the cluster."""
    with new_vhost(rabbit_cluster) as vhost:
        yield vhost


@dataclass(frozen=True)
class ClusterBroker:
    vhost: str
    url: str  # the failover URL the chat's processes are given: every node, node 1 first


@pytest.fixture
def cluster_broker(rabbit_cluster, cluster_vhost, settings) -> Iterator[ClusterBroker]:
    """This test's vhost as the chat uses a cluster: a failover URL listing all three nodes,
    BROKER_QUEUE_TYPE=quorum, the topology declared by `manage.py setup_broker` (through node 1,
    so node 1 leads every queue). Afterwards the cluster has three running nodes again."""
    url = rabbit_cluster.failover_url(cluster_vhost)
    settings.CELERY_BROKER_URL = url
    settings.BROKER_QUEUE_TYPE = "quorum"
    call_command("setup_broker")
    try:
        yield ClusterBroker(cluster_vhost, url)
    finally:
        rabbit_cluster.restore()


@pytest.fixture
def cluster_processes(transactional_db, cluster_broker, tmp_path) -> Iterator[Processes]:
    """The harness's processes (tests/harness.py) on the cluster: every child gets the failover URL
    and BROKER_QUEUE_TYPE=quorum."""
    started = Processes(broker_url=cluster_broker.url, log_dir=tmp_path, env={"BROKER_QUEUE_TYPE": "quorum"})
    yield started
    started.kill_all()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
