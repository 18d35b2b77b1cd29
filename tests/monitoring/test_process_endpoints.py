"""Metrics endpoints of the processes without HTTP: a real prefork Celery worker and the relay."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from chatproject.monitoring.tasks import check_alerts
from chatproject.procfile import free_port, procfile_command, wait_for_port
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
