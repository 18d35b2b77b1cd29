"""Metrics endpoints of the processes without HTTP: a real prefork Celery worker and the relay."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.procfile import free_port, procfile_command, wait_for_port
from monitoring.tasks import check_alerts
from tests.monitoring.conftest import sample

pytestmark = pytest.mark.broker


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def poll(condition: Callable[[], object], *, timeout: float, message: Callable[[], str]) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message())
        time.sleep(0.2)


def test_prefork_worker_serves_task_counters_of_all_its_pool_processes(start_process):
    port = free_port()
    # The Procfile's worker, on the monitoring queue, with two pool processes: the endpoint in the
    # parent must add up what both children counted.
    worker = start_process(
        [
            "bash",
            "-c",
            f"exec {procfile_command('worker')} -Q monitoring --concurrency 2 --metrics-port {port} "
            "--without-mingle --without-gossip",
        ]
    )
    wait_for_port(port, timeout=60, process=worker)
    for _ in range(4):
        check_alerts.apply_async()

    def counted() -> str | None:
        text = read_metrics(port)
        return (
            text
            if sample(text, "celery_tasks_succeeded_total", task="monitoring.check_alerts") == 4
            else None
        )

    text = poll(
        counted,
        timeout=60,
        message=lambda: f"4 successes not counted; log:\n{Path(worker.log_path).read_text()[-3000:]}",
    )

    assert sample(text, "celery_task_duration_seconds_count", task="monitoring.check_alerts") == 4


def test_worker_counts_a_rejected_task(start_process):
    from chatproject.celery import app

    port = free_port()
    worker = start_process(
        [
            "bash",
            "-c",
            f"exec {procfile_command('worker')} --concurrency 1 --metrics-port {port} "
            "--without-mingle --without-gossip",
        ]
    )
    wait_for_port(port, timeout=60, process=worker)
    # Not a list of events: the task rejects it without requeue (dead-lettered).
    app.send_task("analytics.record_chat_events", args=["not a list"])

    poll(
        lambda: (
            sample(read_metrics(port), "celery_tasks_rejected_total", task="analytics.record_chat_events")
            == 1
        ),
        timeout=60,
        message=lambda: f"the rejection was not counted; log:\n{Path(worker.log_path).read_text()[-3000:]}",
    )


def test_relay_serves_its_publish_latency(start_process):
    port = free_port()
    relay = start_process(
        ["bash", "-c", f"exec {procfile_command('relay')} --poll-seconds 1"],
        env={"RELAY_METRICS_PORT": str(port)},
    )
    wait_for_port(port, timeout=60, process=relay)

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


def test_relay_metrics_listen_on_loopback_only_by_default(start_process):
    port = free_port()
    relay = start_process(
        ["bash", "-c", f"exec {procfile_command('relay')} --poll-seconds 1"],
        env={"RELAY_METRICS_PORT": str(port)},
    )
    wait_for_port(port, timeout=60, process=relay)

    assert listening_addresses(port) == {LOOPBACK_V4}


def test_worker_metrics_listen_on_loopback_only_by_default(start_process):
    port = free_port()
    worker = start_process(
        [
            "bash",
            "-c",
            f"exec {procfile_command('worker')} --concurrency 1 --metrics-port {port} "
            "--without-mingle --without-gossip",
        ]
    )
    wait_for_port(port, timeout=60, process=worker)

    assert listening_addresses(port) == {LOOPBACK_V4}


def test_metrics_bind_address_setting_moves_the_endpoint(start_process):
    port = free_port()
    relay = start_process(
        ["bash", "-c", f"exec {procfile_command('relay')} --poll-seconds 1"],
        env={"RELAY_METRICS_PORT": str(port), "METRICS_BIND_ADDRESS": "0.0.0.0"},
    )
    wait_for_port(port, timeout=60, process=relay)

    assert listening_addresses(port) == {"00000000"}
