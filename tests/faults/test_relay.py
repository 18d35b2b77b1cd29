"""The relay as a process: woken by NOTIFY, killed mid-round, cut off from RabbitMQ, run twice."""

from __future__ import annotations

import shlex
import signal
import sys
from urllib.parse import urlsplit

import pytest
from django.db import transaction

from bench.procfile import free_port
from infrastructure.faults import FAULT_CRASH_EXIT_CODE
from messaging.management.commands.run_relay import Command as RunRelay
from messaging.models import OutboxEvent
from messaging.outbox import outbox_event_add
from messaging.publishing import EventPublisher, publish_pending_events
from tests.faults.points import fault_env
from tests.faults.tcp_proxy import TcpProxy
from tests.harness import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]

RELAY = [sys.executable, "manage.py", "run_relay", "--poll-seconds", "1"]


def pending_count() -> int:
    return OutboxEvent.objects.filter(sent_at__isnull=True).count()


def test_relay_process_publishes_events_committed_while_it_runs(relay_process, send_messages, probe_queue):
    events = send_messages(3)

    wait_until(lambda: pending_count() == 0, timeout=30, message="events stayed pending")
    published = [e["event_id"] for m in probe_queue.drain() for e in m.events]
    assert sorted(published) == sorted(str(e.event_id) for e in events)


def test_relay_stops_cleanly_on_sigterm(relay_process):
    relay_process.send_signal(signal.SIGTERM)

    assert relay_process.wait(timeout=30) == 0
    assert "Traceback" not in relay_process.log_text()


def test_relay_killed_between_publish_and_mark_republishes(
    start_process, send_messages, probe_queue, broker_url
):
    [event] = send_messages(1)

    relay = start_process(RELAY, env=fault_env({"relay.after_confirm": "crash"}))

    assert relay.wait(timeout=60) == FAULT_CRASH_EXIT_CODE, relay.log_text()
    assert pending_count() == 1
    publisher = EventPublisher(broker_url)
    try:
        publish_pending_events(publisher=publisher)
    finally:
        publisher.close()
    assert pending_count() == 0
    published = [e["event_id"] for m in probe_queue.drain() for e in m.events]
    assert published == [str(event.event_id)] * 2


def test_production_relay_command_offers_no_fault_hook():
    help_text = RunRelay().create_parser("manage.py", "run_relay").format_help()

    assert "--poll-seconds" in help_text
    assert "crash" not in help_text.lower()
    assert "hook" not in help_text.lower()


def test_broker_outage_leaves_events_pending_and_chat_working_then_they_flow(
    start_process, send_messages, probe_queue, broker_url
):
    proxy = TcpProxy(free_port())
    relay_url = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    relay = start_process([*RELAY, "--broker-url", relay_url])
    try:
        # Chat goes on while the relay cannot reach RabbitMQ.
        events = send_messages(3)
        wait_until(
            lambda: relay.log_text().count("broker unreachable") == 1,
            timeout=30,
            message="relay did not report the outage",
        )
        wait_until(lambda: "retrying" in relay.log_text(), timeout=10, message="no retry")
        assert relay.poll() is None
        assert pending_count() == 3

        proxy.open()

        wait_until(
            lambda: pending_count() == 0, timeout=60, message=f"events stayed pending:\n{relay.log_text()}"
        )
    finally:
        proxy.close()
    log = relay.log_text()
    assert log.count("broker unreachable") == 1  # state changes are logged, not every retry
    assert "reconnected to RabbitMQ" in log
    published = [e["event_id"] for m in probe_queue.drain() for e in m.events]
    assert sorted(published) == sorted(str(e.event_id) for e in events)


def test_relay_process_names_events_no_task_consumes_and_publishes_the_others(
    start_process, send_messages, probe_queue
):
    with transaction.atomic():
        outbox_event_add(routing_key="chat.renamed", payload={})
    events = send_messages(2)

    relay = start_process(RELAY)

    wait_until(
        lambda: "routing key 'chat.renamed' stay pending" in relay.log_text(),
        timeout=30,
        message=f"the unroutable event was not reported:\n{relay.log_text()}",
    )
    wait_until(lambda: pending_count() == 1, timeout=30, message="routable events stayed pending")
    assert OutboxEvent.objects.get(sent_at__isnull=True).routing_key == "chat.renamed"
    published = [e["event_id"] for m in probe_queue.drain() for e in m.events]
    assert sorted(published) == sorted(str(e.event_id) for e in events)


def test_idle_relay_notices_a_silently_dead_broker_connection_and_publishes_after_it(
    processes, send_messages, probe_queue, broker_url
):
    proxy = TcpProxy(free_port())
    proxy.open()
    relay_url = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    relay = processes.start_relay(
        f"--poll-seconds 1 --broker-url {shlex.quote(relay_url)}", env={"RELAY_HEARTBEAT_SECONDS": "1"}
    )
    try:
        # The partition must cut an open broker connection, which the harness's readiness (the
        # relay's LISTEN) comes before: an event published shows the connection is up.
        events = send_messages(1)
        wait_until(lambda: pending_count() == 0, timeout=30, message="the relay published nothing")

        # A partition: no FIN, no RST, nothing to publish; only the heartbeats can tell.
        proxy.blackhole()

        wait_until(
            lambda: "lost the broker connection" in relay.log_text(),
            timeout=60,
            message=f"the idle relay did not notice the dead connection:\n{relay.log_text()}",
        )
        events += send_messages(3)
        assert pending_count() == 3

        proxy.forward()

        wait_until(
            lambda: pending_count() == 0, timeout=90, message=f"events stayed pending:\n{relay.log_text()}"
        )
    finally:
        proxy.close()
    log = relay.log_text()
    assert "heartbeats missed" in log
    assert "reconnected to RabbitMQ" in log
    published = [e["event_id"] for m in probe_queue.drain() for e in m.events]
    assert sorted(published) == sorted(str(e.event_id) for e in events)


def test_two_relays_do_not_publish_the_same_event_twice(processes, send_messages, probe_queue):
    relays = [processes.start_relay("--poll-seconds 1") for _ in range(2)]

    # Each message commits on its own and NOTIFYs both relays, which then race for the same rows.
    events = send_messages(300)

    wait_until(lambda: pending_count() == 0, timeout=120, message="events stayed pending")
    published = [e["event_id"] for m in probe_queue.drain() for e in m.events]
    assert sorted(published) == sorted(str(e.event_id) for e in events)
    assert all(relay.poll() is None for relay in relays)
