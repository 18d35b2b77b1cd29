"""`migrate_queues` on the cluster: a classic installation's queues become quorum queues with a
member on every node, their messages kept."""

from __future__ import annotations

import urllib.parse

from django.core.management import call_command

from messaging.topology import declared_queues
from tests.broker.classic_installation import (
    assert_every_message_once,
    classic_installation_declare,
    classic_installation_fill,
    quorum_settings,
)
from tests.harness import wait_until


def test_migrated_queues_have_members_on_every_node_and_keep_their_messages(
    rabbit_cluster, cluster_vhost, settings
):
    broker_url = rabbit_cluster.nodes[0].url(cluster_vhost)
    classic_installation_declare(broker_url)
    sent = classic_installation_fill(broker_url, analytics=50, notifications=10, dead_letters=5)
    quorum_settings(settings, broker_url)

    call_command("migrate_queues")

    nodes = sorted(node.name for node in rabbit_cluster.nodes)
    vhost = urllib.parse.quote(cluster_vhost, safe="")
    for queue in declared_queues():
        # The management plugin fills in a new queue's members with its next statistics tick.
        info = wait_until(
            lambda q=queue: (
                (found := rabbit_cluster.management_get(f"queues/{vhost}/{q.name}")).get("members") and found
            ),
            timeout=30,
            message=f"the management API never listed {queue.name}'s members",
        )
        assert (info["type"], sorted(info["members"])) == ("quorum", nodes)
    assert_every_message_once(broker_url, sent)
