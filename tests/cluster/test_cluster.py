"""The cluster of ops/rabbitmq-cluster/cluster.sh is a real cluster: three nodes, replicated queues."""

from __future__ import annotations

import json
import urllib.parse

from kombu import Connection, Queue

from tests.harness import wait_until


def test_cluster_has_three_running_nodes(rabbit_cluster):
    status = json.loads(rabbit_cluster.ctl("cluster_status", "--formatter", "json"))

    assert sorted(status["running_nodes"]) == sorted(node.name for node in rabbit_cluster.nodes)


def test_quorum_queue_declared_on_node_one_has_members_on_every_node(rabbit_cluster, cluster_vhost):
    queue = Queue("replicated", durable=True, queue_arguments={"x-queue-type": "quorum"})
    with Connection(rabbit_cluster.nodes[0].url(cluster_vhost)) as connection:
        queue.bind(connection.default_channel).declare()

    path = f"queues/{urllib.parse.quote(cluster_vhost, safe='')}/replicated"
    # The management plugin fills in a new queue's members with its next statistics tick.
    info = wait_until(
        lambda: (found := rabbit_cluster.management_get(path)).get("members") and found,
        timeout=30,
        message="the management API never listed the queue's members",
    )
    assert info["type"] == "quorum"
    assert sorted(info["members"]) == sorted(node.name for node in rabbit_cluster.nodes)
