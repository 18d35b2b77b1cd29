"""With node 1 of the cluster down, the short-lived broker clients go through node 2, the next of
CELERY_BROKER_URL, and say so: setup_broker, `queues` (management API and AMQP), replay; and
/healthz and the broker status page show every node.

Node 1 is stopped once for the whole module (a stop and start takes half a minute), after a vhost
whose every queue is replicated was declared through it; it is started again at the end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client, override_settings
from django.urls import reverse

from deadletters.services.resolution import REPLAY_HEADER
from messaging.connection import broker_connection
from messaging.topology import ANALYTICS_QUEUE_NAME, EXCHANGES, declare_topology, declared_queues
from tests.cluster.conftest import FIRST_CLUSTER_TEST_TIMEOUT, RabbitCluster, new_vhost
from tests.conftest import grant_permission
from tests.deadletters.conftest import archive_letter
from tests.harness import wait_until

# Every test a database test: pytest-django runs those first, so they run one after the other,
# and node 1 is stopped and started once, not once per group.
pytestmark = [FIRST_CLUSTER_TEST_TIMEOUT, pytest.mark.django_db]


@pytest.fixture(scope="module")
def replicated_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """A vhost whose every queue is a quorum queue (notifications too), declared through node 1."""
    with new_vhost(rabbit_cluster) as vhost:
        with (
            override_settings(BROKER_QUEUE_TYPE="quorum"),
            broker_connection(rabbit_cluster.nodes[0].url(vhost)) as connection,
        ):
            declare_topology(connection)
        yield vhost


@pytest.fixture(scope="module")
def node_one_down(rabbit_cluster: RabbitCluster, replicated_vhost: str) -> Iterator[None]:
    with rabbit_cluster.node_stopped(0):
        yield


@pytest.fixture(autouse=True)
def _on_the_cluster(rabbit_cluster: RabbitCluster, replicated_vhost: str, node_one_down, settings) -> None:
    settings.CELERY_BROKER_URL = rabbit_cluster.failover_url(replicated_vhost)
    settings.RABBITMQ_MANAGEMENT_URL = rabbit_cluster.management_urls()
    settings.BROKER_QUEUE_TYPE = "quorum"


def node_two(rabbit_cluster: RabbitCluster) -> str:
    """Node 2 as the clients name the node they use (password masked; kombu writes localhost as
    127.0.0.1)."""
    return f"amqp://guest:***@127.0.0.1:{rabbit_cluster.nodes[1].amqp_port}/"


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_setup_broker_goes_through_node_two_and_names_it(rabbit_cluster):
    output = run("setup_broker")

    assert f"{len(EXCHANGES)} exchanges and {len(declared_queues())} queues are declared" in output
    assert f"(through {node_two(rabbit_cluster)}" in output


def test_queues_reads_node_two_management_api_and_shows_node_one_offline(rabbit_cluster):
    names = [node.name for node in rabbit_cluster.nodes]
    api = f"http://localhost:{rabbit_cluster.nodes[1].management_port}"

    def analytics_from_the_api() -> dict | None:
        row = {row["name"]: row for row in json.loads(run("queues", "--json"))}[ANALYTICS_QUEUE_NAME]
        return row if row["source"] == "management API" else None

    # The management API counts a queue once its stats collector sampled it under its new leader.
    analytics = wait_until(analytics_from_the_api, timeout=60, message="the management API never answered")
    assert analytics["via"] == api
    assert analytics["queue_type"] == "quorum"
    assert sorted(analytics["members"]) == sorted(names)
    assert sorted(analytics["online"]) == sorted(names[1:])
    assert analytics["leader"] in names[1:]
    assert f"answered by {api}" in run("queues")


def test_queues_without_the_management_api_answers_through_node_two(
    rabbit_cluster, replicated_vhost, settings
):
    settings.RABBITMQ_MANAGEMENT_URL = ""

    rows = json.loads(run("queues", "--json"))

    assert {(row["source"], row["via"]) for row in rows} == {
        ("passive declare", node_two(rabbit_cluster) + replicated_vhost)
    }


def test_replay_publishes_through_node_two_and_names_it(rabbit_cluster, settings):
    letter = archive_letter()

    output = run("dlq", "replay", str(letter.pk))

    assert f"replayed 1 dead letters through {node_two(rabbit_cluster)}" in output
    with broker_connection(settings.CELERY_BROKER_URL) as connection:
        replayed = connection.default_channel.basic_get(ANALYTICS_QUEUE_NAME, no_ack=True)
    assert replayed is not None
    assert replayed.properties["application_headers"][REPLAY_HEADER] == letter.pk


def test_healthz_is_degraded_and_lists_each_node_without_addresses():
    response = Client().get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded: broker"
    assert body["broker"] == (
        "degraded: 1 of 3 RabbitMQ nodes is not reachable: the others carry on while a majority of "
        "the cluster answers"
    )
    assert body["broker_nodes"] == [
        {"node": 1, "state": "down", "in_use": False},
        {"node": 2, "state": "ok", "in_use": True},
        {"node": 3, "state": "ok", "in_use": False},
    ]
    assert "localhost" not in response.content.decode()


def test_healthz_tells_staff_each_node_and_why_node_one_is_down(rabbit_cluster, replicated_vhost, make_user):
    staff = Client()
    staff.force_login(make_user("root", is_staff=True))

    nodes = staff.get("/healthz").json()["broker_nodes"]

    assert [node["url"] for node in nodes] == [
        f"amqp://guest:***@localhost:{node.amqp_port}/{replicated_vhost}" for node in rabbit_cluster.nodes
    ]
    assert nodes[0]["state"].startswith("down: ") and "refused" in nodes[0]["state"]
    assert [node["state"] for node in nodes[1:]] == ["ok", "ok"]
    assert [node["in_use"] for node in nodes] == [False, True, False]


def _rows(html: str, table: str, key: str) -> dict[str, str]:
    """Each row of the page's table `table`, by its data-`key`, as its text."""
    body = re.search(rf'<table id="{table}">(.*?)</table>', html, re.S).group(1)
    return {
        match.group(1): re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", match.group(2))).strip()
        for match in re.finditer(rf'<tr data-{key}="([^"]+)"[^>]*>(.*?)</tr>', body, re.S)
    }


def test_broker_status_page_shows_each_node_and_where_the_queues_live(rabbit_cluster, make_user):
    names = [node.name for node in rabbit_cluster.nodes]
    staff = Client()
    user = make_user("operator", is_staff=True)
    grant_permission(user, "deadletters.view_deadletter")
    staff.force_login(user)

    def page() -> str | None:
        html = staff.get(reverse("admin:deadletters_broker_status")).content.decode()
        # The management API knows the members once the queue's new leader reported them.
        return html if "(offline)" in _rows(html, "broker-queues", "queue")[ANALYTICS_QUEUE_NAME] else None

    html = wait_until(page, timeout=60, message="the page never showed node 1's member offline")
    nodes = _rows(html, "broker-nodes", "node")
    assert nodes["1"].startswith(f"1 amqp://guest:***@localhost:{rabbit_cluster.nodes[0].amqp_port}/")
    assert "not reachable: " in nodes["1"] and "uses this node" not in nodes["1"]
    assert f"{names[1]} reachable uses this node" in nodes["2"]
    assert nodes["3"].endswith(f"{names[2]} reachable")
    analytics = _rows(html, "broker-queues", "queue")[ANALYTICS_QUEUE_NAME]
    assert f"{names[0]} (offline)" in analytics
    assert "quorum" in analytics
