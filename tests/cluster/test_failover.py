"""The long-running processes on a cluster (CELERY_BROKER_URL listing its three nodes): the relay,
an analytics worker and the dead-letter archiver connected to node 1 move to another node when
node 1 stops, keep working, and say which node they use."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from analytics import selectors
from bench.procfile import ROOT, ProcfileProcess
from deadletters.models import DeadLetter
from messaging.models import OutboxEvent
from messaging.topology import ANALYTICS_QUEUE, DEAD_LETTER_QUEUE
from tests.analytics.test_pipeline import store_in_one_commit
from tests.cluster.conftest import FIRST_CLUSTER_TEST_TIMEOUT
from tests.deadletters.conftest import wait_for_log
from tests.harness import QUIET_WORKER, Processes, wait_until

DEADLINE = 90

pytestmark = FIRST_CLUSTER_TEST_TIMEOUT


def _node(port: int) -> str:
    """How a process's log names the node on `port` (kombu writes localhost as 127.0.0.1)."""
    return f"127.0.0.1:{port}/"


def start_worker(processes: Processes) -> ProcfileProcess:
    return processes.start_consumer("worker", ANALYTICS_QUEUE.name, f"--concurrency 1 {QUIET_WORKER}")


def test_relay_worker_and_archiver_on_node_one_move_to_another_node_and_keep_working(
    rabbit_cluster, cluster_processes, make_user, make_room
):
    first, second = (_node(node.amqp_port) for node in rabbit_cluster.nodes[:2])
    worker = start_worker(cluster_processes)
    archiver = cluster_processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE.name)
    relay = cluster_processes.start_relay("--poll-seconds 0.5")
    # Each says which node it uses: node 1, the first of the URL. (The relay connects to RabbitMQ
    # after its LISTEN, so its line is also when it is on node 1.)
    wait_for_log(relay, f"relay connected to RabbitMQ at amqp://guest:***@{first}")
    assert f"archiver connected to RabbitMQ at amqp://guest:***@{first}" in archiver.log_text()
    assert f"Connected to amqp://guest:**@{first}" in worker.log_text()
    alice, room = make_user("alice"), make_room("general")

    with rabbit_cluster.node_stopped(0):
        # Events stored after the stop are published by the relay and counted by the worker.
        store_in_one_commit(room=room, author=alice, count=3)
        wait_until(
            lambda: selectors.room_message_count(room_id=room.pk) == 3,
            timeout=DEADLINE,
            message=lambda: f"not counted after node 1 stopped; worker log:\n{worker.log_text()[-3000:]}",
        )
        # An event the worker refuses is dead-lettered, and archived.
        OutboxEvent.objects.create(
            event_id=uuid.uuid4(), routing_key="chat.message.created", payload={"message_id": 1}
        )
        wait_until(
            DeadLetter.objects.exists,
            timeout=DEADLINE,
            message=lambda: f"not archived after node 1 stopped; log:\n{archiver.log_text()[-3000:]}",
        )
        assert DeadLetter.objects.get().reason == "rejected"

        assert f"relay reconnected to RabbitMQ at amqp://guest:***@{second}" in relay.log_text()
        assert f"archiver reconnected to RabbitMQ at amqp://guest:***@{second}" in archiver.log_text()
        assert f"Connected to amqp://guest:**@{second}" in worker.log_text()
        assert [process.poll() for process in (relay, worker, archiver)] == [None] * 3


def test_a_task_retried_with_a_countdown_on_quorum_queues_comes_back_through_delayed_delivery(
    cluster_processes, make_user, make_room
):
    """Retries with backoff publish the task again with a countdown; on quorum queues Celery sends it
    through RabbitMQ's delayed-delivery exchanges, which the worker declares when it connects
    (messaging/delayed_delivery.py). Without them the publish fails."""
    alice, room = make_user("alice"), make_room("general")
    start_worker(cluster_processes)
    store_in_one_commit(room=room, author=alice, count=1)
    event = OutboxEvent.objects.get().payload

    # What Task.retry does, from a process whose queues are quorum queues as the worker's are.
    subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "import json, os; from analytics.tasks import record_chat_events; "
            "record_chat_events.apply_async(args=[[json.loads(os.environ['EVENT'])]], countdown=1)",
        ],
        cwd=ROOT,
        env={**cluster_processes.env(), "EVENT": json.dumps(event)},
        check=True,
        capture_output=True,
        timeout=120,
    )

    wait_until(
        lambda: selectors.room_message_count(room_id=room.pk) == 1,
        timeout=DEADLINE,
        message="the delayed task was never counted",
    )
