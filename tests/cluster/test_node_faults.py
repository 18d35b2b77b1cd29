"""Losing RabbitMQ nodes during chat traffic, with real nodes and real processes (issue 12).

Chat users talk through a real daphne while the relay, two analytics workers and the dead-letter
archiver run on the three-node cluster with quorum queues (BROKER_QUEUE_TYPE=quorum, a failover URL
listing every node). A test then kills a node with SIGKILL, cuts one off into a minority, or restarts
all three one after another; afterwards every message a user saw acknowledged is stored and counted
exactly once. Each test prints its counts (acked, stored, counted, lost, duplicated); docs/scaling.md
keeps the measured ones.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from django.db import connection
from kombu import Connection

from analytics.models import ProcessedEvent
from bench.procfile import DaphneServer, ProcfileProcess, free_port
from chat.models import Message, Room
from deadletters.models import DeadLetter
from messaging.events import MESSAGE_CREATED, message_created_payload
from messaging.models import OutboxEvent
from messaging.topology import ANALYTICS_QUEUE_NAME, CHAT_EVENTS_EXCHANGE, DEAD_LETTER_QUEUE_NAME
from messaging.wire import task_message_build
from tests.cluster.chat_traffic import ChatTraffic, PipelineCounts, pipeline_counts, wait_until_settled
from tests.faults.tcp_proxy import TcpProxy
from tests.harness import Processes, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(400)]

WORKERS = 2
USERS = 3
# Each user sends about three messages a second: a few hundred messages per test.
SEND_INTERVAL_SECONDS = 0.3
# Generous bounds for a stuck process or node, never performance claims.
RECONNECT_DEADLINE = 60
SETTLE_DEADLINE = 120


@dataclass(frozen=True)
class ChatSetting:
    server: DaphneServer
    room: Room
    users: list


@pytest.fixture
def chat(make_user, make_room, cluster_broker, tmp_path) -> Iterator[ChatSetting]:
    """A room, its users, and the Procfile's web process serving them (it needs no broker to chat)."""
    room = make_room("general")
    users = [make_user(f"user{i}") for i in range(USERS)]
    server = DaphneServer(
        port=free_port(),
        extra_env={"CELERY_BROKER_URL": cluster_broker.url, "BROKER_QUEUE_TYPE": "quorum"},
        log_path=tmp_path / "daphne.log",
    )
    server.start()
    try:
        yield ChatSetting(server, room, users)
    finally:
        server.stop()


def start_pipeline(processes: Processes) -> list[ProcfileProcess]:
    """WORKERS analytics workers, the relay and the archiver, each ready; returns the workers."""
    workers = [processes.start_analytics_worker() for _ in range(WORKERS)]
    processes.start_relay("--poll-seconds 0.5")
    processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE_NAME)
    return workers


def await_restart(restart: subprocess.Popen) -> None:
    assert restart.wait(timeout=300) == 0, restart.communicate()[0]


def seconds_until(condition: Callable[[], bool], *, since: float, what: str) -> float:
    wait_until(condition, timeout=RECONNECT_DEADLINE, message=f"{what} did not happen")
    return time.monotonic() - since


def reconnect_seconds(
    rabbit_cluster, vhost: str, *, dead: int, killed_at: float, last_event: int
) -> dict[str, float]:
    """Seconds from the kill until the relay had published an event stored after it, and until every
    worker and the archiver consumed through another node (upper bounds: a round of checks takes a
    database query and a management API call, and a new consumer shows there within a second)."""
    expected = {ANALYTICS_QUEUE_NAME: WORKERS, DEAD_LETTER_QUEUE_NAME: 1}
    names = {ANALYTICS_QUEUE_NAME: "workers_reconnected", DEAD_LETTER_QUEUE_NAME: "archiver_reconnected"}
    survivor = (dead + 1) % len(rabbit_cluster.nodes)
    seconds: dict[str, float] = {}
    while len(seconds) < 3:
        relay_published = OutboxEvent.objects.filter(id__gt=last_event, sent_at__isnull=False).exists()
        consumers = rabbit_cluster.consumer_nodes(vhost, node=survivor)
        elapsed = time.monotonic() - killed_at
        if relay_published:
            seconds.setdefault("relay_reconnected", elapsed)
        for queue, count in expected.items():
            if sum(1 for node in consumers.get(queue, []) if node != dead) == count:
                seconds.setdefault(names[queue], elapsed)
        if len(seconds) < 3 and elapsed > RECONNECT_DEADLINE:
            pytest.fail(f"after {elapsed:.0f}s, only these had reconnected: {seconds}")
        time.sleep(0.2)
    return seconds


def settle_and_count(
    rabbit_cluster, vhost: str, *, traffic: ChatTraffic, room: Room, workers: list[ProcfileProcess]
) -> PipelineCounts:
    wait_until_settled(
        room=room,
        analytics_queue_messages=lambda: rabbit_cluster.queue_messages(vhost, ANALYTICS_QUEUE_NAME),
        timeout=SETTLE_DEADLINE,
    )
    return pipeline_counts(room=room, acked=traffic.acked, workers=workers)


def report(record, fault: str, counts: PipelineCounts, **seconds: float) -> None:
    """Print the counts and figures (seen with pytest -s) and put them in the junit report, as
    properties named `<fault>.<count>` (record: the record_testsuite_property fixture)."""
    print(f"\n{fault}: {counts}" + "".join(f" {name}={value:.1f}s" for name, value in seconds.items()))
    for name, value in {
        **dataclasses.asdict(counts),
        **{name: round(value, 1) for name, value in seconds.items()},
    }.items():
        record(f"{fault}.{name}", value)


def assert_exact(counts: PipelineCounts, traffic: ChatTraffic) -> None:
    assert traffic.failures == [], "every chat user got every acknowledgement"
    assert [frame for frame in traffic.frames if frame.get("type") != "message"] == [], "no error frame"
    assert counts.acked == traffic.sent() > 0
    assert (counts.lost, counts.duplicated) == (0, 0), counts
    assert counts.counted == counts.stored, counts


def test_killing_the_node_that_leads_the_analytics_queue_loses_and_duplicates_nothing(
    rabbit_cluster, cluster_broker, cluster_processes, chat, record_testsuite_property
):
    workers = start_pipeline(cluster_processes)
    traffic = ChatTraffic(chat.server, chat.users, room=chat.room, interval=SEND_INTERVAL_SECONDS).start()
    traffic.wait_for_sent(10 * USERS)
    vhost = cluster_broker.vhost
    leader = rabbit_cluster.queue_leader(vhost, ANALYTICS_QUEUE_NAME)
    last_event_before = OutboxEvent.objects.order_by("-id").values_list("id", flat=True).first()

    killed_at = time.monotonic()
    rabbit_cluster.kill(leader)

    reconnected = reconnect_seconds(
        rabbit_cluster, vhost, dead=leader, killed_at=killed_at, last_event=last_event_before
    )
    await_restart(rabbit_cluster.start_node(leader))
    traffic.finish()

    counts = settle_and_count(rabbit_cluster, vhost, traffic=traffic, room=chat.room, workers=workers)
    report(record_testsuite_property, "leader_killed", counts, **reconnected)
    assert_exact(counts, traffic)


# The poison message holds its worker this long before the database refuses it, every time: long
# enough to kill its node while a worker has it, short enough to fail again soon after.
POISON_HOLD_SECONDS = 3


@pytest.fixture
def poison_event(make_room, make_user) -> Iterator[dict]:
    """A valid chat event that fails in every worker that takes it: the database holds the ledger
    insert of its id for POISON_HOLD_SECONDS, then refuses it (a trigger). An error no task expects,
    so each failure rejects the message and RabbitMQ dead-letters it."""
    room = make_room("poison")
    event = message_created_payload(
        event_id=uuid.uuid4(),
        room_id=room.pk,
        room=room.slug,
        author_id=make_user("poisoner").pk,
        message_id=1,
        seq=1,
        created_at=datetime.now(UTC),
    )
    table = ProcessedEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION test_poison_event() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_sleep({POISON_HOLD_SECONDS}); RAISE EXCEPTION 'test: a poison event'; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER test_poison_event BEFORE INSERT ON {table} FOR EACH ROW "
            f"WHEN (NEW.event_id = '{event['event_id']}') EXECUTE FUNCTION test_poison_event()"
        )
    yield event
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TRIGGER IF EXISTS test_poison_event ON {table}")
        cursor.execute("DROP FUNCTION IF EXISTS test_poison_event()")


def a_worker_holds_the_poison() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event = 'PgSleep'"
        )
        return cursor.fetchone()[0] > 0


def test_a_poison_message_in_flight_when_its_node_dies_is_archived_once(
    rabbit_cluster, cluster_broker, cluster_processes, chat, poison_event, record_testsuite_property
):
    workers = start_pipeline(cluster_processes)
    traffic = ChatTraffic(chat.server, chat.users, room=chat.room, interval=SEND_INTERVAL_SECONDS).start()
    traffic.wait_for_sent(5 * USERS)
    vhost = cluster_broker.vhost
    leader = rabbit_cluster.queue_leader(vhost, ANALYTICS_QUEUE_NAME)
    poison = task_message_build(routing_key=MESSAGE_CREATED.routing_key, rows=[(1, poison_event)])
    with Connection(cluster_broker.url) as broker:
        broker.default_channel.basic_publish_confirm(
            poison.message,
            exchange=CHAT_EVENTS_EXCHANGE.name,
            routing_key=MESSAGE_CREATED.routing_key,
            mandatory=True,
        )
    wait_until(
        a_worker_holds_the_poison, timeout=RECONNECT_DEADLINE, message="no worker took the poison message"
    )

    rabbit_cluster.kill(leader)

    await_restart(rabbit_cluster.start_node(leader))
    traffic.finish()
    wait_until(
        DeadLetter.objects.filter(task_id=poison.task_id).exists,
        timeout=SETTLE_DEADLINE,
        message="the poison message never reached the dead-letter archive",
    )
    counts = settle_and_count(rabbit_cluster, vhost, traffic=traffic, room=chat.room, workers=workers)
    # With both queues empty, no further copy of the poison is on its way anywhere.
    wait_until(
        lambda: rabbit_cluster.queue_messages(vhost, DEAD_LETTER_QUEUE_NAME) == 0,
        timeout=SETTLE_DEADLINE,
        message="dead letters stayed in their queue",
    )
    archived = DeadLetter.objects.filter(task_id=poison.task_id).count()
    report(record_testsuite_property, "poison_in_flight", counts)
    print(f"poison_in_flight: its dead letters archived={archived}")
    record_testsuite_property("poison_in_flight.dead_letters", archived)
    assert archived == 1
    assert not ProcessedEvent.objects.filter(event_id=poison_event["event_id"]).exists()
    assert_exact(counts, traffic)


# The relay's and the archiver's heartbeat interval while one node is cut off: they notice the
# silent connection after about two (the default, 10 s, takes 20-25 s).
HEARTBEAT_SECONDS = "2"
# A cut-off node heals itself after this long, should the test die before it heals it.
PARTITION_BACKSTOP_SECONDS = 300


def test_a_node_cut_off_into_a_minority_makes_no_split_brain_duplicates(
    rabbit_cluster, cluster_broker, cluster_processes, chat, record_testsuite_property
):
    vhost = cluster_broker.vhost
    cut, majority = 0, (1, 2)
    assert rabbit_cluster.queue_leader(vhost, ANALYTICS_QUEUE_NAME) == cut, (
        "setup_broker declared through node 1"
    )
    # Every client reaches the node to cut through a proxy, which drops its packets as a partition would.
    proxy = TcpProxy(free_port(), target=("127.0.0.1", rabbit_cluster.nodes[cut].amqp_port))
    proxy.open()
    through_proxy = {
        "CELERY_BROKER_URL": rabbit_cluster.failover_url(vhost, proxy_ports={cut: proxy.port}),
        "RELAY_HEARTBEAT_SECONDS": HEARTBEAT_SECONDS,
        "DLQ_ARCHIVER_HEARTBEAT_SECONDS": HEARTBEAT_SECONDS,
    }
    try:
        workers = [
            cluster_processes.start_analytics_worker(env=through_proxy),
            # Clients are spread over the nodes: this worker starts on the majority's side.
            cluster_processes.start_analytics_worker(
                env={"CELERY_BROKER_URL": rabbit_cluster.failover_url(vhost, order=(1, 2, 0))}
            ),
        ]
        cluster_processes.start_relay("--poll-seconds 0.5", env=through_proxy)
        cluster_processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE_NAME, env=through_proxy)
        traffic = ChatTraffic(chat.server, chat.users, room=chat.room, interval=SEND_INTERVAL_SECONDS).start()
        traffic.wait_for_sent(5 * USERS)
        last_message_before = (
            Message.objects.filter(room=chat.room).order_by("-id").values_list("id", flat=True).first()
        )

        cut_at = time.monotonic()
        proxy.blackhole()
        rabbit_cluster.cut_off(cut, heal_after=PARTITION_BACKSTOP_SECONDS)

        wait_until(
            lambda: rabbit_cluster.connected_nodes(majority[0]) == {majority[1]},
            timeout=RECONNECT_DEADLINE,
            message="the majority still sees the cut-off node",
        )
        # pause_minority: the node on its own stops serving clients, so nothing can write to it.
        wait_until(
            lambda: not rabbit_cluster.serves(cut),
            timeout=RECONNECT_DEADLINE,
            message="the cut-off node still serves clients",
        )
        wait_until(
            lambda: rabbit_cluster.queue_leader(vhost, ANALYTICS_QUEUE_NAME, node=majority[0]) != cut,
            timeout=RECONNECT_DEADLINE,
            message="the analytics queue's leader did not move to the majority",
        )
        majority_seconds = seconds_until(
            lambda: ProcessedEvent.objects.filter(
                room=chat.room, message_id__gt=last_message_before
            ).exists(),
            since=cut_at,
            what="analytics counting a message stored after the cut, through the majority",
        )
        healed_at = time.monotonic()
        rabbit_cluster.heal(cut)
        wait_until(
            lambda: rabbit_cluster.connected_nodes(cut) == set(majority),
            timeout=RECONNECT_DEADLINE,
            message="the cut-off node did not rejoin",
        )
        proxy.forward()
        # Its RabbitMQ application starts again once it sees a majority.
        wait_until(
            lambda: rabbit_cluster.serves(cut), timeout=RECONNECT_DEADLINE, message="it did not resume"
        )
        rejoined_seconds = time.monotonic() - healed_at
        traffic.finish()
    finally:
        proxy.close()

    counts = settle_and_count(rabbit_cluster, vhost, traffic=traffic, room=chat.room, workers=workers)
    report(
        record_testsuite_property,
        "minority_cut_off",
        counts,
        majority_counting=majority_seconds,
        rejoined_after_heal=rejoined_seconds,
    )
    assert_exact(counts, traffic)


def test_restarting_every_node_in_turn_under_load_loses_nothing_and_shows_no_error(
    rabbit_cluster, cluster_broker, cluster_processes, chat, record_testsuite_property
):
    workers = start_pipeline(cluster_processes)
    traffic = ChatTraffic(chat.server, chat.users, room=chat.room, interval=SEND_INTERVAL_SECONDS).start()
    traffic.wait_for_sent(5 * USERS)

    started = time.monotonic()
    for node in range(len(rabbit_cluster.nodes)):
        # A node may go only when every quorum queue keeps a majority without it: the one restarted
        # before must have caught up.
        rabbit_cluster.ctl(
            "await_online_quorum_plus_one", "--timeout", "120", node=node, tool="rabbitmq-upgrade"
        )
        rabbit_cluster.ctl("stop_app", node=node)
        rabbit_cluster.ctl("start_app", node=node)  # returns once the application runs
    rolling_seconds = time.monotonic() - started
    traffic.finish()

    counts = settle_and_count(
        rabbit_cluster, cluster_broker.vhost, traffic=traffic, room=chat.room, workers=workers
    )
    report(record_testsuite_property, "rolling_restart", counts, rolling_restart=rolling_seconds)
    assert_exact(counts, traffic)
