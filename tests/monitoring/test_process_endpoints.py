"""Metrics endpoints of the processes without HTTP: a real prefork Celery worker and the relay."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from bench.procfile import ProcfileProcess, free_port, port_open, procfile_argv
from monitoring.tasks import check_alerts
from tests.harness import Processes, wait_until
from tests.monitoring.conftest import sample

pytestmark = pytest.mark.broker


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def start_serving_metrics(
    processes: Processes, name: str, extra_args: str, *, port: int, env: dict[str, str] | None = None
) -> ProcfileProcess:
    """The Procfile's `name`, once its metrics endpoint on `port` answers."""
    return processes.start(procfile_argv(name, extra_args), env=env, ready=port_open(port), name=name)


def test_prefork_worker_serves_task_counters_of_all_its_pool_processes(processes):
    port = free_port()
    # The Procfile's worker, on the monitoring queue, with two pool processes: the endpoint in the
    # parent must add up what both children counted.
    worker = start_serving_metrics(
        processes,
        "worker",
        f"-Q monitoring --concurrency 2 --metrics-port {port} --without-mingle --without-gossip",
        port=port,
    )
    for _ in range(4):
        check_alerts.apply_async()

    def counted() -> str | None:
        text = read_metrics(port)
        return (
            text
            if sample(text, "celery_tasks_succeeded_total", task="monitoring.check_alerts") == 4
            else None
        )

    text = wait_until(
        counted,
        timeout=60,
        message=lambda: f"4 successes not counted; log:\n{worker.log_text()[-3000:]}",
    )

    assert sample(text, "celery_task_duration_seconds_count", task="monitoring.check_alerts") == 4


def test_worker_counts_a_rejected_task(processes):
    from chatproject.celery import app

    port = free_port()
    worker = start_serving_metrics(
        processes,
        "worker",
        f"--concurrency 1 --metrics-port {port} --without-mingle --without-gossip",
        port=port,
    )
    # Not a list of events: the task rejects it without requeue (dead-lettered).
    app.send_task("analytics.record_chat_events", args=["not a list"])

    wait_until(
        lambda: (
            sample(read_metrics(port), "celery_tasks_rejected_total", task="analytics.record_chat_events")
            == 1
        ),
        timeout=60,
        message=lambda: f"the rejection was not counted; log:\n{worker.log_text()[-3000:]}",
    )


def test_relay_serves_its_publish_latency(processes):
    port = free_port()
    start_serving_metrics(
        processes, "relay", "--poll-seconds 1", port=port, env={"RELAY_METRICS_PORT": str(port)}
    )

    text = read_metrics(port)

    assert "chat_relay_publish_seconds_bucket" in text


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6, in hex)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


LOOPBACK_V4 = "0100007F"  # 127.0.0.1, as /proc/net/tcp writes it


def test_relay_metrics_listen_on_loopback_only_by_default(processes):
    port = free_port()
    start_serving_metrics(
        processes, "relay", "--poll-seconds 1", port=port, env={"RELAY_METRICS_PORT": str(port)}
    )

    assert listening_addresses(port) == {LOOPBACK_V4}


def test_worker_metrics_listen_on_loopback_only_by_default(processes):
    port = free_port()
    start_serving_metrics(
        processes,
        "worker",
        f"--concurrency 1 --metrics-port {port} --without-mingle --without-gossip",
        port=port,
    )

    assert listening_addresses(port) == {LOOPBACK_V4}


def test_metrics_bind_address_setting_moves_the_endpoint(processes):
    port = free_port()
    start_serving_metrics(
        processes,
        "relay",
        "--poll-seconds 1",
        port=port,
        env={"RELAY_METRICS_PORT": str(port), "METRICS_BIND_ADDRESS": "0.0.0.0"},
    )

    assert listening_addresses(port) == {"00000000"}
