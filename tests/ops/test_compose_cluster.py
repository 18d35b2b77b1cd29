"""docker-compose.cluster.yml on top of docker-compose.yml: three RabbitMQ nodes forming one cluster,
every process pointed at all three with quorum queues; the single node stays the default.

Checked with `docker-compose config`, Debian's compose v1 (the package provides the `docker-compose`
command, not the `docker compose` plugin), which `make test` installs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import ROOT
from tests.ops.test_deployment_files import procfile_names

CLUSTER_FILES = ("docker-compose.yml", "docker-compose.cluster.yml")
NODE_CONFIG = "ops/rabbitmq-cluster/rabbitmq.conf"
COMPOSE_ENV = {
    "SECRET_KEY": "k" * 50,
    "METRICS_BEARER_TOKEN": "a-token",
    "RABBITMQ_ERLANG_COOKIE": "a-cookie",
}


def compose_config(*files: str, without: str | None = None) -> subprocess.CompletedProcess:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is missing: `make test` installs it (apt-get install docker-compose)")
    env = {**os.environ, **COMPOSE_ENV}
    env.pop(without or "", None)
    return subprocess.run(
        [executable, *(arg for file in files for arg in ("-f", file)), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def merged_services(*files: str) -> dict[str, dict]:
    result = compose_config(*files)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def rabbitmq_nodes(services: dict[str, dict]) -> dict[str, dict]:
    return {name: service for name, service in services.items() if service["image"].startswith("rabbitmq:")}


def reachable_names(services: dict[str, dict]) -> set[str]:
    """Service names and network aliases: what containers resolve each other by."""
    aliases = {
        alias
        for service in services.values()
        for network in (service.get("networks") or {}).values()
        for alias in (network or {}).get("aliases", [])
    }
    return set(services) | aliases


def test_the_single_node_compose_stays_the_default():
    services = merged_services("docker-compose.yml")

    assert list(rabbitmq_nodes(services)) == ["rabbitmq"]
    assert services["worker"]["environment"]["CELERY_BROKER_URL"] == "amqp://guest:guest@rabbitmq:5672//"


def test_cluster_variant_runs_three_rabbitmq_nodes_each_with_health_check_data_volume_and_management():
    services = merged_services(*CLUSTER_FILES)
    nodes = rabbitmq_nodes(services)

    assert len(nodes) == 3
    names = reachable_names(services)
    data_volumes, management_ports = set(), set()
    for node in nodes.values():
        assert node["hostname"] in names  # the others reach it by its node name's host
        assert node["healthcheck"]["test"]
        assert node["environment"]["RABBITMQ_ERLANG_COOKIE"] == COMPOSE_ENV["RABBITMQ_ERLANG_COOKIE"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in node["volumes"]}
        data_volumes.add(mounts["/var/lib/rabbitmq"])
        assert mounts["/etc/rabbitmq/conf.d/20-cluster.conf"] == str(ROOT / NODE_CONFIG)
        management_ports |= {port["published"] for port in node["ports"] if port["target"] == 15672}
    assert len(data_volumes) == len(management_ports) == 3


def test_each_node_is_configured_to_discover_all_three_as_peers():
    nodes = rabbitmq_nodes(merged_services(*CLUSTER_FILES))
    settings = {}
    for line in (ROOT / NODE_CONFIG).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()

    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    peers = {
        value for key, value in settings.items() if key.startswith("cluster_formation.classic_config.nodes.")
    }
    assert peers == {f"rabbit@{node['hostname']}" for node in nodes.values()}


def test_every_procfile_process_uses_all_three_nodes_and_quorum_queues():
    services = merged_services(*CLUSTER_FILES)
    nodes = rabbitmq_nodes(services)
    hostnames = {node["hostname"] for node in nodes.values()}

    # lb (HAProxy) forwards HTTP to the web processes and never talks to RabbitMQ.
    for name in [*(name for name in procfile_names() if name != "lb"), "migrate"]:
        environment = services[name]["environment"]
        urls = environment["CELERY_BROKER_URL"].split(";")
        assert {urlsplit(url).hostname for url in urls} == hostnames, name
        assert len(urls) == 3, name
        assert environment["BROKER_QUEUE_TYPE"] == "quorum", name
        for node in nodes:
            assert services[name]["depends_on"][node] == {"condition": "service_healthy"}, (name, node)


def test_cluster_variant_refuses_to_start_without_an_erlang_cookie():
    result = compose_config(*CLUSTER_FILES, without="RABBITMQ_ERLANG_COOKIE")

    assert result.returncode != 0
    assert "set RABBITMQ_ERLANG_COOKIE" in result.stderr
