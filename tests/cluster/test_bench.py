"""The benchmarks on the cluster: bench_publish's confirmed path against its quorum queues beside
the seed loop on the single node, and bench_analytics_lag's pipeline through them. Tiny sizes:
the counts are checked, never the timings."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from infrastructure.health import redacted_url
from messaging.topology import ANALYTICS_QUEUE_NAME

# The first test of tests/cluster also waits for the session's cluster to start: on a loaded
# 2-core machine that alone takes up to three minutes, the suite's default timeout.
pytestmark = [pytest.mark.broker, pytest.mark.timeout(400)]


def _vhosts(rabbit_cluster) -> set[str]:
    return {vhost["name"] for vhost in rabbit_cluster.management_get("vhosts")}


def _on_cluster(settings, rabbit_cluster, vhost: str = "/") -> None:
    settings.CELERY_BROKER_URL = rabbit_cluster.failover_url(vhost)
    settings.BROKER_QUEUE_TYPE = "quorum"
    settings.RABBITMQCTL_NODE = rabbit_cluster.nodes[0].name


@pytest.mark.django_db(transaction=True)
def test_bench_publish_confirms_every_event_on_the_cluster_beside_the_single_node_seed_loop(
    rabbit_cluster, broker_url, settings
):
    vhosts_before = _vhosts(rabbit_cluster)
    _on_cluster(settings, rabbit_cluster)
    out = io.StringIO()

    call_command("bench_publish", count=450, repeat=2, baseline_url=broker_url, json=True, stdout=out)

    report = json.loads(out.getvalue())
    assert report["outbox_queue_type"] == "quorum"
    assert report["outbox_broker"] == redacted_url(rabbit_cluster.failover_url())
    assert report["seed_broker"] == redacted_url(broker_url)
    assert report["outbox_messages"] == 3  # 200 + 200 + 50 events
    assert report["outbox_confirmed"] == 2 * 450
    assert report["outbox_queued"] == 2 * 3
    assert report["seed_queued"] == 2 * 450
    # The scratch vhost the run needed on the cluster is gone again.
    assert _vhosts(rabbit_cluster) == vhosts_before


def test_bench_analytics_lag_counts_every_event_through_the_clusters_quorum_queues(
    rabbit_cluster, cluster_vhost, transactional_db, settings, capsys
):
    _on_cluster(settings, rabbit_cluster, cluster_vhost)

    call_command("bench_analytics_lag", rate=100, seconds=0.5, events_only=True, rooms=2, users=3, json=True)

    report = json.loads(capsys.readouterr().out)
    assert report["messages"] == 50
    assert report["counted"] == 50
    queue_types = dict(
        line.split("\t")
        for line in rabbit_cluster.ctl("list_queues", "-p", cluster_vhost, "name", "type").splitlines()
    )
    assert queue_types[ANALYTICS_QUEUE_NAME] == "quorum"
