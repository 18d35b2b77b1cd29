"""BROKER_QUEUE_TYPE=quorum on the cluster: setup_broker declares replicated work and dead-letter
queues with the broker-side safety arguments, and --check names classic queues left behind."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from messaging.topology import (
    ANALYTICS_QUEUE_NAME,
    DEAD_LETTER_QUEUE_NAME,
    MONITORING_QUEUE_NAME,
    NOTIFICATIONS_QUEUE_NAME,
    QUORUM_DELIVERY_LIMIT,
    VIP_NOTIFICATIONS_QUEUE_NAME,
)

WORK_QUEUE_NAMES = (
    ANALYTICS_QUEUE_NAME,
    MONITORING_QUEUE_NAME,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
)


def _queues(rabbit_cluster, vhost: str) -> dict[str, dict]:
    rows = rabbit_cluster.ctl("list_queues", "-p", vhost, "name", "type", "arguments", "--formatter", "json")
    # rabbitmqctl's JSON gives a queue's arguments as [name, AMQP type, value] triples.
    return {
        row["name"]: {**row, "arguments": {name: value for name, _type, value in row["arguments"]}}
        for row in json.loads(rows)
    }


def test_setup_broker_with_quorum_declares_quorum_work_and_dead_letter_queues(
    rabbit_cluster, cluster_vhost, settings
):
    settings.CELERY_BROKER_URL = rabbit_cluster.nodes[0].url(cluster_vhost)
    settings.BROKER_QUEUE_TYPE = "quorum"

    call_command("setup_broker")

    queues = _queues(rabbit_cluster, cluster_vhost)
    for name in WORK_QUEUE_NAMES:
        assert queues[name]["type"] == "quorum"
        assert queues[name]["arguments"] == {
            "x-dead-letter-exchange": "dead_letter",
            "x-queue-type": "quorum",
            "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    assert queues[DEAD_LETTER_QUEUE_NAME]["type"] == "quorum"


def test_setup_broker_check_names_classic_queues_when_quorum_is_configured(
    rabbit_cluster, cluster_vhost, settings, capsys
):
    settings.CELERY_BROKER_URL = rabbit_cluster.nodes[0].url(cluster_vhost)
    settings.BROKER_QUEUE_TYPE = "classic"
    call_command("setup_broker")
    capsys.readouterr()

    settings.BROKER_QUEUE_TYPE = "quorum"
    with pytest.raises(CommandError, match="5 difference"):
        call_command("setup_broker", "--check", "--json")

    differences = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(differences) == {*WORK_QUEUE_NAMES, DEAD_LETTER_QUEUE_NAME}
    for difference in differences.values():
        assert difference["problem"].startswith("exists with other arguments")
    # Nothing was changed: the queues are still classic.
    assert {row["type"] for row in _queues(rabbit_cluster, cluster_vhost).values()} == {"classic"}
