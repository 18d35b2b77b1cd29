"""`bench_priority` on the cluster with the node leading the notification queues killed (-9) halfway:
every notification is delivered exactly once or dead-lettered as expired. Its timings are the
benchmark's business (docs/scaling.md), not this test's."""

from __future__ import annotations

import pytest

from bench.priority import Account, benchmark_priority
from messaging.topology import DEAD_LETTER_QUEUE_NAME, NOTIFICATIONS_QUEUE_NAME, VIP_NOTIFICATIONS_QUEUE_NAME

BACKLOG, VIP, EXPIRING = 200, 10, 5


@pytest.mark.timeout(300)
def test_bench_priority_with_the_leader_killed_delivers_each_notification_once_or_dead_letters_it(
    rabbit_cluster, settings, transactional_db
):
    settings.CELERY_BROKER_URL = rabbit_cluster.failover_url("/")
    settings.BROKER_QUEUE_TYPE = "quorum"
    settings.RABBITMQ_MANAGEMENT_URL = f"http://localhost:{rabbit_cluster.nodes[0].management_port}"
    try:
        result = benchmark_priority(
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
    # The queues are declared through node 1, so it led all three; each has a new leader now.
    assert kill.node == rabbit_cluster.nodes[0].name
    assert set(kill.led) == {VIP_NOTIFICATIONS_QUEUE_NAME, NOTIFICATIONS_QUEUE_NAME, DEAD_LETTER_QUEUE_NAME}
    assert all(leader not in (None, kill.node) for leader in kill.new_leaders.values()), kill.new_leaders
