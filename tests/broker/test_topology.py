"""The topology module and `manage.py setup_broker` against the real RabbitMQ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection, Queue

from bench.procfile import ROOT, child_process_env, free_port, procfile_command
from messaging.topology import (
    ANALYTICS_QUEUE,
    CHAT_EVENTS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
    declare_topology,
    topology_differences,
)
from tests.harness import wait_until

pytestmark = pytest.mark.broker


def setup_broker(broker_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "setup_broker", *args],
        cwd=ROOT,
        env={**child_process_env(), "CELERY_BROKER_URL": broker_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_declare_topology_is_idempotent(scratch_broker_url):
    with Connection(scratch_broker_url) as conn:
        declare_topology(conn)
        declare_topology(conn)
        assert topology_differences(conn) == []


def test_every_work_queue_names_the_dead_letter_exchange(scratch_broker_url):
    with Connection(scratch_broker_url) as conn:
        declare_topology(conn)
        # Redeclaring with the DLX argument succeeds only if the broker's queue has exactly it.
        Queue(
            ANALYTICS_QUEUE.name,
            exchange=CHAT_EVENTS_EXCHANGE,
            durable=True,
            queue_arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name},
        ).bind(conn.default_channel).queue_declare()


def test_setup_broker_then_check_reports_no_difference(scratch_broker_url):
    assert setup_broker(scratch_broker_url).returncode == 0
    check = setup_broker(scratch_broker_url, "--check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_check_reports_missing_entities_without_creating_them(scratch_broker_url):
    check = setup_broker(scratch_broker_url, "--check")
    assert check.returncode == 1
    assert "analytics" in check.stderr and "is missing" in check.stderr
    with Connection(scratch_broker_url) as conn:
        differences = topology_differences(conn)
    assert {d.name for d in differences} >= {ANALYTICS_QUEUE.name, CHAT_EVENTS_EXCHANGE.name}
    assert all(d.problem == "is missing" for d in differences)


def test_check_reports_queue_declared_with_other_arguments(scratch_broker_url):
    with Connection(scratch_broker_url) as conn:
        declare_topology(conn)
        ANALYTICS_QUEUE.bind(conn.default_channel).delete()
        Queue(ANALYTICS_QUEUE.name, durable=True).bind(conn.default_channel).queue_declare()

    check = setup_broker(scratch_broker_url, "--check")

    assert check.returncode == 1
    assert "Traceback" not in check.stdout + check.stderr
    output = " ".join(check.stderr.split())  # the rich table wraps long cells
    assert "exists with other arguments" in output
    assert "x-dead-letter-exchange" in output
    assert "manage.py migrate_queues" in output


def test_setup_broker_reports_a_mismatched_queue_and_leaves_it_alone(scratch_broker_url):
    with Connection(scratch_broker_url) as conn:
        Queue(ANALYTICS_QUEUE.name, durable=True).bind(conn.default_channel).queue_declare()

    result = setup_broker(scratch_broker_url)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    with Connection(scratch_broker_url) as conn:
        mismatched = [d.name for d in topology_differences(conn) if d.problem != "is missing"]
    assert mismatched == [ANALYTICS_QUEUE.name]


def test_check_names_the_notifications_priority_queue_of_an_older_installation(scratch_broker_url):
    # Before the VIP queue, VIP mentions jumped one classic priority queue.
    with Connection(scratch_broker_url) as conn:
        declare_topology(conn)
        channel = conn.default_channel
        channel.queue_delete(NOTIFICATIONS_QUEUE_NAME)
        channel.queue_delete(VIP_NOTIFICATIONS_QUEUE_NAME)
        Queue(
            NOTIFICATIONS_QUEUE_NAME,
            exchange=CHAT_EVENTS_EXCHANGE,
            routing_key="chat.mention",
            durable=True,
            queue_arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name, "x-max-priority": 10},
        ).bind(channel).declare()

        differences = {d.name: d.problem for d in topology_differences(conn)}

    assert set(differences) == {NOTIFICATIONS_QUEUE_NAME, VIP_NOTIFICATIONS_QUEUE_NAME}
    assert "x-max-priority" in differences[NOTIFICATIONS_QUEUE_NAME]
    assert differences[VIP_NOTIFICATIONS_QUEUE_NAME] == "is missing"


def test_setup_broker_with_rabbitmq_down_says_so_in_one_line():
    result = setup_broker(f"amqp://guest:guest@127.0.0.1:{free_port()}//", "--check")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("CommandError: RabbitMQ is not reachable at")
    assert "rabbitmq-server -detached" in result.stderr


def test_worker_start_declares_the_topology(start_process, scratch_broker_url):
    worker = start_process(
        [
            "bash",
            "-c",
            f"exec {procfile_command('worker')} --concurrency 1 --without-mingle --without-gossip",
        ],
        env={"CELERY_BROKER_URL": scratch_broker_url},
    )

    def declared() -> bool:
        assert worker.poll() is None, Path(worker.log_path).read_text()
        with Connection(scratch_broker_url) as conn:
            return topology_differences(conn) == []

    wait_until(declared, timeout=60, message="the worker did not declare the topology")
