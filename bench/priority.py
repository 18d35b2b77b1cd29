"""`manage.py bench_priority`: VIP notification latency behind a large backlog of normal ones, and
an account of every notification, on one RabbitMQ node or a cluster, where the node leading the
notification queues can be killed (-9) in the middle of the run.

Runs in a RabbitMQ vhost of its own (deleted afterwards) with its own notifiers (the Procfile's
`notifier` and `notifier_vip` commands), so no real worker sees the benchmark's tasks. Task messages
are built and published by the relay's own code (`task_message_build` of messaging.wire,
EventPublisher of messaging.publishing, with confirms), one mention event per message as the relay
publishes them; the notifiers run the real delivery service, mailing an offline user through the
file-based email backend into a directory of the run's own.

Latency is the ledger's `delivered_at` minus the event's `queued_at` (the moment it was handed to
the publisher, so a publish held up by a lost node counts), both from this machine's clock.

The account: every notification sent (confirmed by the broker) must end either delivered once (a
ledger row and one email: each benchmark message names its notification) or dead-lettered with
reason "expired", never both, never twice, never neither. `expiring` notifications with a TTL of
one second are queued first and expire before the notifiers start, so the expired path is always
exercised; the others live an hour, so that every normal latency is measured. The rows are
deleted at the end.
"""

from __future__ import annotations

import email
import json
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import InterfaceError, OperationalError
from django.db import connection as db_connection
from django.utils import timezone
from kombu import Connection

from bench.procfile import (
    ProcessNotReady,
    ProcfileProcess,
    child_process_env,
    procfile_argv,
    queue_consumers,
    wait_until,
)
from bench.rabbitmq_nodes import NodesUnavailable, RabbitNodes
from chat.models import Message, NotificationDelivery, Room
from infrastructure.health import broker_nodes
from messaging.connection import BrokerUnavailable
from messaging.events import (
    MENTION,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    VIP_MENTION,
    EventType,
    event_envelope,
    mention_fields,
)
from messaging.publishing import EventPublisher
from messaging.topology import (
    DEAD_LETTER_QUEUE_NAME,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
    ScratchVhostError,
    scratch_vhost,
)
from messaging.wire import task_message_build

T = TypeVar("T")

PUBLISH_CHUNK = 500  # task messages per confirm wait while building the backlog
BENCH_PREFIX = "bench-priority"
# Long enough for every normal notification of a 10,000 backlog to be delivered and measured.
TTL = timedelta(hours=1)
EXPIRING_TTL = timedelta(seconds=1)
# A publish that failed (a lost node) is tried again for this long before the run gives up.
PUBLISH_RETRY_SECONDS = 60.0
# The queues empty and no delivery for this long: whatever is unaccounted for is lost.
SETTLED_SECONDS = 15.0
# The file-based email backend ends every message with a line of 79 dashes.
_MAIL_SEPARATOR = "\n" + "-" * 79 + "\n"
_MAIL_NOTIFICATION = re.compile(r"bench-notification ([0-9a-f-]{36})")


class BenchmarkError(Exception):
    """The benchmark could not run or finish; the message says why."""


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50: float
    p99: float
    max: float


@dataclass(frozen=True)
class Account:
    """What became of every notification the broker confirmed: each counted in one row."""

    sent: int
    delivered: int  # exactly once: one ledger row and one email
    duplicated: int  # emailed more than once, or delivered and dead-lettered too
    expired: int  # dead-lettered with reason "expired", not delivered
    dead_lettered_otherwise: int  # dead-lettered for another reason (rejected, delivery limit)
    lost: int  # none of the above (no email, no dead letter)
    expected_expired: int  # the `expiring` ones

    @property
    def exact(self) -> bool:
        """Every notification delivered exactly once or dead-lettered as expired."""
        return self.duplicated == 0 and self.lost == 0 and self.dead_lettered_otherwise == 0


@dataclass(frozen=True)
class LeaderKill:
    node: str
    pid: int
    led: tuple[str, ...]  # the queues it led when killed
    after_vip: int  # VIP notifications sent before the kill
    new_leaders: dict[str, str | None]  # queue -> its leader at the end
    vip_after: LatencySummary | None  # the VIP notifications sent after the kill


@dataclass(frozen=True)
class PriorityResult:
    backlog: int
    vip: LatencySummary
    normal: LatencySummary
    backlog_at_vip_sends: tuple[int, int]  # (min, max) normal queue depth when a VIP task was sent
    drain_seconds: float  # from the first delivery to the last
    queue_type: str
    nodes: int
    account: Account
    leader_kill: LeaderKill | None


def benchmark_priority(
    *,
    backlog: int,
    vip_count: int,
    vip_interval: float,
    timeout: float,
    expiring: int = 0,
    kill_leader: bool = False,
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
) -> PriorityResult:
    """`benchmark_priority_in` a vhost of its own on CELERY_BROKER_URL, deleted afterwards.

    rabbitmqctl's default node is this machine's own; a cluster's nodes (a broker URL naming
    several, or `kill_leader`) come from the management APIs of RABBITMQ_MANAGEMENT_URL.
    """
    broker_url = settings.CELERY_BROKER_URL
    nodes = None
    if kill_leader or len(broker_nodes(broker_url)) > 1:
        try:
            nodes = RabbitNodes.discover(broker_url)
        except NodesUnavailable as error:
            raise BenchmarkError(
                f"on a cluster the benchmark reads RABBITMQ_MANAGEMENT_URL's management APIs: {error}"
            ) from None
    try:
        with scratch_vhost(
            "bench_priority", broker_url=broker_url, rabbitmq_nodes=nodes.names if nodes else ()
        ) as url:
            return benchmark_priority_in(
                url,
                nodes=nodes,
                backlog=backlog,
                vip_count=vip_count,
                vip_interval=vip_interval,
                expiring=expiring,
                kill_leader=kill_leader,
                timeout=timeout,
                progress=progress,
            )
    except ScratchVhostError as error:
        raise BenchmarkError(f"bench_priority works in a vhost of its own: {error}") from error


def benchmark_priority_in(
    url: str,
    *,
    nodes: RabbitNodes | None,
    backlog: int,
    vip_count: int,
    vip_interval: float,
    timeout: float,
    expiring: int = 0,
    kill_leader: bool = False,
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
) -> PriorityResult:
    """In the vhost of `url` (the topology declared, nothing else using it): queue the expiring
    notifications and the backlog with no notifier running, start both notifiers, send VIP
    notifications while the backlog drains (with `kill_leader`, kill -9 the node of `nodes` that
    leads the VIP queue halfway), then account for every notification."""
    if kill_leader and settings.BROKER_QUEUE_TYPE != "quorum":
        raise BenchmarkError(
            "--kill-leader needs BROKER_QUEUE_TYPE=quorum: a classic queue dies with its node"
        )
    if kill_leader and (nodes is None or len(nodes.names) < 3):
        raise BenchmarkError("--kill-leader needs a cluster of three nodes or more")
    if kill_leader and vip_count < 4:
        raise BenchmarkError("--kill-leader needs --vip 4 or more: percentiles before and after the kill")
    return _PriorityRun(
        url,
        nodes=nodes,
        backlog=backlog,
        vip_count=vip_count,
        vip_interval=vip_interval,
        expiring=expiring,
        kill_leader=kill_leader,
        timeout=timeout,
        progress=progress,
    ).run()


class _PriorityRun:
    def __init__(
        self,
        url: str,
        *,
        nodes: RabbitNodes | None,
        backlog: int,
        vip_count: int,
        vip_interval: float,
        expiring: int,
        kill_leader: bool,
        timeout: float,
        progress: Callable[[str, int, int], None],
    ) -> None:
        self.url = url
        self.vhost = Connection(broker_nodes(url)[0]).virtual_host
        self.nodes = nodes
        self.backlog = backlog
        self.vip_count = vip_count
        self.vip_interval = vip_interval
        self.expiring = expiring
        self.kill_leader = kill_leader
        self.timeout = timeout
        self.progress = progress
        self.mail_dir = Path(tempfile.mkdtemp(prefix="bench-priority-mail-"))
        self.notifiers: list[ProcfileProcess] = []

    def run(self) -> PriorityResult:
        try:
            expiring_ids, normal_ids, vip_ids, depths, kill = self._send()
            sent = expiring_ids + normal_ids + vip_ids
            self._wait_until_settled(sent)
            account = self._account(sent, expected_expired=len(expiring_ids))
            if kill is not None:
                new_leaders = {queue: self._leader(queue) for queue in kill.led}
                vip_after_kill = _latencies(vip_ids[kill.after_vip :])
                kill = LeaderKill(kill.node, kill.pid, kill.led, kill.after_vip, new_leaders, vip_after_kill)
            return PriorityResult(
                backlog=self.backlog,
                vip=_latencies(vip_ids),
                normal=_latencies(normal_ids),
                backlog_at_vip_sends=(min(depths), max(depths)),
                drain_seconds=_drain_seconds(normal_ids + vip_ids),
                queue_type=settings.BROKER_QUEUE_TYPE,
                nodes=len(self.nodes.names) if self.nodes else 1,
                account=account,
                leader_kill=kill,
            )
        finally:
            for notifier in self.notifiers:
                notifier.stop(timeout=20)
            _with_db_retry(_delete_bench_data)
            shutil.rmtree(self.mail_dir, ignore_errors=True)

    def _send(
        self,
    ) -> tuple[list[uuid.UUID], list[uuid.UUID], list[uuid.UUID], list[int], LeaderKill | None]:
        """The expiring notifications (left to expire), the backlog, the notifiers, the VIP ones."""
        messages, target_id = _bench_messages(self.expiring + self.backlog + self.vip_count)
        publisher = EventPublisher(self.url)
        try:
            expiring_ids = self._publish(
                publisher, messages[: self.expiring], target_id, event_type=MENTION, ttl=EXPIRING_TTL
            )
            self._wait(
                lambda: self._depth(DEAD_LETTER_QUEUE_NAME) >= len(expiring_ids),
                timeout=60,
                what="the expiring notifications to be dead-lettered",
            )
            normal_ids = self._publish(
                publisher,
                messages[self.expiring : self.expiring + self.backlog],
                target_id,
                event_type=MENTION,
                ttl=TTL,
                stage="backlog",
            )
            self.notifiers.append(self._start_notifier("notifier", NOTIFICATIONS_QUEUE_NAME))
            self.notifiers.append(self._start_notifier("notifier_vip", VIP_NOTIFICATIONS_QUEUE_NAME))
            self._wait(
                lambda: _delivered_count(normal_ids) > 0, timeout=60, what="the notifier's first delivery"
            )
            vip_ids, depths, kill = self._send_vips(
                publisher, messages[self.expiring + self.backlog :], target_id
            )
        finally:
            publisher.close()
        return expiring_ids, normal_ids, vip_ids, depths, kill

    # --- sending ---------------------------------------------------------------------------

    def _send_vips(
        self, publisher: EventPublisher, messages: list[tuple[Message, uuid.UUID]], target_id: int
    ) -> tuple[list[uuid.UUID], list[int], LeaderKill | None]:
        vip_ids: list[uuid.UUID] = []
        depths: list[int] = []
        kill = None
        for n, message in enumerate(messages):
            if self.kill_leader and n == len(messages) // 2:
                kill = self._kill_leader(after_vip=n)
            depths.append(self._depth(NOTIFICATIONS_QUEUE_NAME))
            vip_ids += self._publish(publisher, [message], target_id, event_type=VIP_MENTION, ttl=TTL)
            self.progress("vip", n + 1, len(messages))
            time.sleep(self.vip_interval)
        return vip_ids, depths, kill

    def _publish(
        self,
        publisher: EventPublisher,
        messages: list[tuple[Message, uuid.UUID]],
        target_id: int,
        *,
        event_type: EventType[Any],
        ttl: timedelta,
        stage: str = "",
    ) -> list[uuid.UUID]:
        """Publish one notification per message, confirmed; a publish the broker did not confirm
        (a node lost meanwhile) is tried again, as the relay does: a copy is the ledger's business."""
        priority = PRIORITY_HIGH if event_type is VIP_MENTION else PRIORITY_LOW
        ids: list[uuid.UUID] = []
        for start in range(0, len(messages), PUBLISH_CHUNK):
            batch = []
            for message, notification_id in messages[start : start + PUBLISH_CHUNK]:
                queued_at = timezone.now()
                event = event_envelope(
                    routing_key=event_type.routing_key,
                    event_id=notification_id,
                    fields=mention_fields(
                        user_id=target_id,
                        message_id=message.pk,
                        room_id=message.room_id,
                        author_id=message.author_id,
                        priority=priority,
                        queued_at=queued_at,
                        expires_at=queued_at + ttl,
                    ),
                )
                batch.append(task_message_build(routing_key=event_type.routing_key, rows=[(0, event)]))
                ids.append(notification_id)
            deadline = time.monotonic() + PUBLISH_RETRY_SECONDS
            while batch:
                try:
                    confirmed = {m.task_id for m in publisher.publish(batch)}
                    batch = [m for m in batch if m.task_id not in confirmed]
                    problem = "the broker refused some messages"
                except BrokerUnavailable as error:
                    problem = str(error)
                if batch and time.monotonic() > deadline:
                    raise BenchmarkError(f"could not publish for {PUBLISH_RETRY_SECONDS:.0f}s: {problem}")
                if batch:
                    time.sleep(0.2)
            if stage:
                self.progress(stage, len(ids), len(messages))
        return ids

    # --- the cluster -----------------------------------------------------------------------

    def _leader(self, queue: str) -> str | None:
        assert self.nodes is not None
        try:
            return self.nodes.queue_leader(vhost=self.vhost, queue=queue)
        except NodesUnavailable:
            return None

    def _kill_leader(self, *, after_vip: int) -> LeaderKill:
        """Kill -9 the node leading the VIP queue (usually all three queues: they are declared
        through one connection, and a quorum queue's leader starts on the declaring node)."""
        assert self.nodes is not None
        queues = (VIP_NOTIFICATIONS_QUEUE_NAME, NOTIFICATIONS_QUEUE_NAME, DEAD_LETTER_QUEUE_NAME)
        node = self._wait(
            lambda: self._leader(VIP_NOTIFICATIONS_QUEUE_NAME), timeout=30, what="the VIP queue's leader"
        )
        led = tuple(queue for queue in queues if self._leader(queue) == node)
        try:
            pid = self.nodes.kill(node)
        except NodesUnavailable as error:
            raise BenchmarkError(str(error)) from None
        return LeaderKill(node, pid, led, after_vip, {}, None)

    # --- the notifiers ---------------------------------------------------------------------

    def _start_notifier(self, name: str, queue: str) -> ProcfileProcess:
        """The Procfile's `name` on the benchmark's vhost, once it consumes `queue`."""
        env = {
            **child_process_env(),
            "CELERY_BROKER_URL": self.url,
            "BROKER_QUEUE_TYPE": settings.BROKER_QUEUE_TYPE,
            # Four slashes for an absolute directory: django-environ drops the first one of the path.
            "EMAIL_URL": f"filemail:///{self.mail_dir}",
            "LOG_LEVEL": "WARNING",
        }
        notifier = ProcfileProcess(
            procfile_argv(name, "--without-mingle --without-gossip --metrics-port 0 --loglevel WARNING"),
            env=env,
            ready=lambda: queue_consumers(self.url, queue) > 0,  # the vhost is the benchmark's own
        )
        try:
            notifier.start()
        except ProcessNotReady as error:
            notifier.kill()  # when it is alive but not consuming
            raise BenchmarkError(f"the {name} did not start: {error}") from None
        return notifier

    # --- the account -----------------------------------------------------------------------

    def _wait_until_settled(self, sent: list[uuid.UUID]) -> None:
        """Until every notification is delivered or dead-lettered, or the queues have stayed
        empty with no new delivery for SETTLED_SECONDS (the rest is lost), or `timeout`."""
        deadline = time.monotonic() + self.timeout
        last = (-1, -1)
        last_change = time.monotonic()
        while True:
            for notifier in self.notifiers:
                if notifier.poll() is not None:
                    raise BenchmarkError(f"{notifier} exited with {notifier.returncode}")
            state = (_delivered_count(sent), self._depth(DEAD_LETTER_QUEUE_NAME))
            self.progress("drain", min(sum(state), len(sent)), len(sent))
            if sum(state) >= len(sent):
                return
            if state != last:
                last, last_change = state, time.monotonic()
            queued = self._depth(NOTIFICATIONS_QUEUE_NAME) + self._depth(VIP_NOTIFICATIONS_QUEUE_NAME)
            if queued == 0 and time.monotonic() - last_change > SETTLED_SECONDS:
                return
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"only {sum(state)} of {len(sent)} notifications settled in {self.timeout:.0f}s"
                )
            time.sleep(0.5)

    def _account(self, sent: list[uuid.UUID], *, expected_expired: int) -> Account:
        in_ledger = set(
            _with_db_retry(
                lambda: list(
                    NotificationDelivery.objects.filter(notification_id__in=sent).values_list(
                        "notification_id", flat=True
                    )
                )
            )
        )
        emails = _emails_by_notification(self.mail_dir)
        dead = self._dead_letters()
        duplicated = {nid for nid, count in emails.items() if count > 1} | (in_ledger & set(dead))
        delivered = {nid for nid in in_ledger if emails[nid] == 1} - duplicated
        expired = {nid for nid, reasons in dead.items() if "expired" in reasons} - duplicated
        otherwise = set(dead) - expired - duplicated
        return Account(
            sent=len(sent),
            delivered=len(delivered),
            duplicated=len(duplicated),
            expired=len(expired),
            dead_lettered_otherwise=len(otherwise),
            lost=len(set(sent) - delivered - duplicated - expired - otherwise),
            expected_expired=expected_expired,
        )

    def _dead_letters(self) -> dict[uuid.UUID, set[str]]:
        """Every dead letter in the benchmark's vhost, read and acked: notification id -> reasons."""
        found: dict[uuid.UUID, set[str]] = {}
        with Connection(self.url) as connection:
            channel = connection.default_channel
            while (message := channel.basic_get(DEAD_LETTER_QUEUE_NAME, no_ack=True)) is not None:
                reason = (message.headers or {}).get("x-first-death-reason", "")
                args, _kwargs, _embed = json.loads(message.body)
                for event in args[0]:
                    found.setdefault(uuid.UUID(event["event_id"]), set()).add(reason)
        return found

    # --- helpers ---------------------------------------------------------------------------

    def _depth(self, queue: str) -> int:
        with Connection(self.url) as connection:
            return connection.default_channel.queue_declare(queue, passive=True).message_count

    def _wait(self, condition: Callable[[], T], *, timeout: float, what: str) -> T:
        try:
            return wait_until(condition, timeout=timeout, message=f"gave up waiting for {what}")
        except TimeoutError as error:
            raise BenchmarkError(str(error)) from None


def _bench_messages(count: int) -> tuple[list[tuple[Message, uuid.UUID]], int]:
    """`count` messages by a bench author, each mentioning a bench user who has no socket (so each
    notification is emailed), and the notification id each one's text names; and that user's id."""
    users = get_user_model().objects
    suffix = uuid.uuid4().hex[:6]
    author = users.create_user(f"{BENCH_PREFIX}-author-{suffix}")
    target = users.create_user(f"{BENCH_PREFIX}-target-{suffix}", email="bench@example.invalid")
    room = Room.objects.create(slug=f"{BENCH_PREFIX}-{suffix}", name="Priority benchmark")
    notification_ids = [uuid.uuid4() for _ in range(count)]
    messages = Message.objects.bulk_create(
        Message(
            room=room,
            author=author,
            text=f"@{target.username} bench-notification {notification_id}",
            client_id=uuid.uuid4(),
            seq=n + 1,
        )
        for n, notification_id in enumerate(notification_ids)
    )
    return list(zip(messages, notification_ids, strict=True)), target.pk


def _emails_by_notification(directory: Path) -> Counter[uuid.UUID]:
    """How many emails the notifiers sent for each notification (named in the message text)."""
    counts: Counter[uuid.UUID] = Counter()
    for path in directory.glob("*.log"):
        for text in path.read_text(errors="replace").split(_MAIL_SEPARATOR):
            if not text.strip():
                continue
            body = email.message_from_string(text).get_payload(decode=True) or b""
            found = _MAIL_NOTIFICATION.findall(body.decode(errors="replace"))
            counts.update(uuid.UUID(notification_id) for notification_id in found)
    return counts


def _delete_bench_data() -> None:
    Room.objects.filter(slug__startswith=BENCH_PREFIX).delete()  # with its messages and their ledger rows
    get_user_model().objects.filter(username__startswith=BENCH_PREFIX).delete()


def _delivered_count(ids: list[uuid.UUID]) -> int:
    return _with_db_retry(lambda: NotificationDelivery.objects.filter(notification_id__in=ids).count())


def _with_db_retry(query: Callable[[], T], attempts: int = 60) -> T:
    """Run a read again after a lost database connection (a restart elsewhere on a shared machine)."""
    for _ in range(attempts - 1):
        try:
            return query()
        except (OperationalError, InterfaceError):
            db_connection.close()
            time.sleep(1.0)
    return query()


def _latencies(ids: list[uuid.UUID]) -> LatencySummary:
    rows = NotificationDelivery.objects.filter(notification_id__in=ids).values_list(
        "queued_at", "delivered_at"
    )
    seconds = sorted((delivered - queued).total_seconds() for queued, delivered in rows)
    if len(seconds) < 2:
        raise BenchmarkError("too few deliveries to compute percentiles")
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return LatencySummary(count=len(seconds), p50=cuts[49], p99=cuts[98], max=seconds[-1])


def _drain_seconds(ids: list[uuid.UUID]) -> float:
    times = NotificationDelivery.objects.filter(notification_id__in=ids).values_list(
        "delivered_at", flat=True
    )
    return (max(times) - min(times)).total_seconds()
