"""The dead-letter archiver under faults: SIGKILLed between its commit and its ack, cut off from
RabbitMQ by a silent partition. Every letter is archived once: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
from urllib.parse import urlsplit

import pytest

from bench.procfile import free_port
from deadletters.models import DeadLetter
from messaging.topology import DEAD_LETTER_QUEUE
from tests.deadletters.conftest import (  # noqa: F401 (_empty_queues: each test starts with empty queues)
    _empty_queues,
    analytics_task_message,
    chat_event,
    log_text,
    publish,
    queue_depth,
    wait_for_log,
)
from tests.faults.points import fault_env
from tests.faults.tcp_proxy import TcpProxy
from tests.harness import wait_until

pytestmark = pytest.mark.broker


def test_archiver_killed_mid_way_loses_nothing_and_duplicates_nothing(broker_url, start_archiver):
    total = 200
    task_ids = set()
    for _ in range(total):
        message = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
        task_ids.add(message.properties["correlation_id"])
        publish(broker_url, message)
    wait_until(
        lambda: queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == total,
        timeout=60,
        message="the expired messages did not all reach dead_letters",
    )

    # Paused between its commit and its ack: the kill lands on committed-but-unacked letters.
    archiver = start_archiver(**fault_env({"archiver.after_commit": "0.5"}), DLQ_ARCHIVER_PREFETCH="20")
    wait_until(lambda: DeadLetter.objects.count() >= 30, timeout=60, message="the archiver archived nothing")
    os.killpg(archiver.pid, signal.SIGKILL)
    archiver.wait()
    archived_at_kill = DeadLetter.objects.count()
    assert archived_at_kill < total

    start_archiver()
    wait_until(
        lambda: DeadLetter.objects.count() >= total and queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == 0,
        timeout=90,
        message="the restarted archiver did not archive the rest",
    )
    assert DeadLetter.objects.count() == total
    assert set(DeadLetter.objects.values_list("task_id", flat=True)) == task_ids


def test_identical_letters_that_die_together_are_archived_once_each_across_a_kill(broker_url, start_archiver):
    # Byte-identical messages (same body, headers, task id) that expire together: their x-death
    # entries are identical too, down to the second. Content cannot tell them apart.
    total = 60
    message = analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0)
    publish(broker_url, message, copies=total)
    wait_until(
        lambda: queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == total,
        timeout=60,
        message="the expired copies did not all reach dead_letters",
    )

    archiver = start_archiver(**fault_env({"archiver.after_commit": "30"}), DLQ_ARCHIVER_PREFETCH="20")
    # The fault point pauses the archiver right after its first commit, for longer than this waits.
    wait_until(DeadLetter.objects.exists, timeout=60, message="the archiver committed nothing")
    os.killpg(archiver.pid, signal.SIGKILL)  # its first batch committed, not acked
    archiver.wait()
    archived_at_kill = DeadLetter.objects.count()
    assert 0 < archived_at_kill < total

    start_archiver()
    wait_until(
        lambda: DeadLetter.objects.count() >= total and queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == 0,
        timeout=90,
        message="the restarted archiver did not archive every copy",
    )
    assert DeadLetter.objects.count() == total
    assert DeadLetter.objects.values("fingerprint").distinct().count() < total
    # Every ack was handled, so no row may be taken over by a later redelivery.
    assert not DeadLetter.objects.filter(ack_pending=True).exists()


def test_idle_archiver_notices_a_silently_dead_broker_connection_and_archives_after_it(
    broker_url, start_archiver
):
    proxy = TcpProxy(free_port())
    proxy.open()
    archiver_url = urlsplit(broker_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    try:
        archiver = start_archiver(CELERY_BROKER_URL=archiver_url, DLQ_ARCHIVER_HEARTBEAT_SECONDS="1")

        # A partition: no FIN, no RST, nothing to archive; only the heartbeats can tell.
        proxy.blackhole()

        wait_for_log(archiver, "lost the broker connection")
        letters = [
            analytics_task_message([chat_event(room_id=1, author_id=1)], expiration_ms=0) for _ in range(5)
        ]
        for message in letters:
            publish(broker_url, message)
        wait_until(
            lambda: queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == len(letters),
            timeout=60,
            message="the expired messages did not all reach dead_letters",
        )
        # Reconnecting into the partition fails (a connect timeout) instead of hanging.
        wait_for_log(archiver, "broker unreachable")
        assert not DeadLetter.objects.exists()

        proxy.forward()

        wait_until(
            lambda: (
                DeadLetter.objects.count() >= len(letters)
                and queue_depth(broker_url, DEAD_LETTER_QUEUE.name) == 0
            ),
            timeout=90,
            message=f"the letters were not archived after the partition:\n{log_text(archiver)[-3000:]}",
        )
    finally:
        proxy.close()
    assert sorted(DeadLetter.objects.values_list("task_id", flat=True)) == sorted(
        message.properties["correlation_id"] for message in letters
    )
    log = log_text(archiver)
    assert "heartbeats missed" in log
    assert "dead-letter archiver reconnected to RabbitMQ" in log
