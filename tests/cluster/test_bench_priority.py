"""`bench_priority` on the cluster with the node leading the notification queues killed (-9) halfway:
every notification is delivered exactly once or dead-lettered as expired. Its timings are the
benchmark's business (docs/scaling.md), not this test's."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from bench.priority import Account, benchmark_priority_in
from bench.rabbitmq_nodes import RabbitNodes
from messaging.topology import DEAD_LETTER_QUEUE_NAME, NOTIFICATIONS_QUEUE_NAME, VIP_NOTIFICATIONS_QUEUE_NAME

BACKLOG, VIP, EXPIRING = 60, 8, 5


@pytest.mark.timeout(300)
def test_bench_priority_with_the_leader_killed_delivers_each_notification_once_or_dead_letters_it(
    rabbit_cluster, cluster_vhost, settings, transactional_db
):
    # The vhost is the fixture's, deleted once the killed node is back: with a node down, deleting
    # a vhost's quorum queues takes RabbitMQ minutes.
    url = rabbit_cluster.failover_url(cluster_vhost)
    settings.CELERY_BROKER_URL = url
    settings.BROKER_QUEUE_TYPE = "quorum"
    settings.RABBITMQ_MANAGEMENT_URL = rabbit_cluster.management_urls()
    call_command("setup_broker")  # through node 1, so node 1 leads every queue
    nodes = RabbitNodes.discover(url)
    try:
        result = benchmark_priority_in(
            url,
            nodes=nodes,
            backlog=BACKLOG,
            vip_count=VIP,
            vip_interval=0.1,
            expiring=EXPIRING,
            kill_leader=True,
            timeout=240,
        )
    finally:
        rabbit_cluster.restore()

    assert result.account == Account(
        sent=EXPIRING + BACKLOG + VIP,
        delivered=BACKLOG + VIP,
        duplicated=0,
        expired=EXPIRING,
        dead_lettered_otherwise=0,
        lost=0,
        expected_expired=EXPIRING,
    )
    kill = result.leader_kill
    assert kill is not None and kill.after_vip == VIP // 2
    assert kill.node == rabbit_cluster.nodes[0].name
    assert set(kill.led) == {VIP_NOTIFICATIONS_QUEUE_NAME, NOTIFICATIONS_QUEUE_NAME, DEAD_LETTER_QUEUE_NAME}
    assert all(leader not in (None, kill.node) for leader in kill.new_leaders.values()), kill.new_leaders
