"""The soak benchmark, driven by `manage.py soak` (docs/performance.md).

Mixed traffic runs against the chat's running processes for a set time: page views, the history
API, logins and logouts over HTTP, and sockets that connect, send (some messages mention other
users), drop and reconnect. Meanwhile every process of the Procfile that uses this database is
sampled: its PostgreSQL connections, resident memory, open file descriptors and threads; so are
Redis (this installation's keys, the server's memory), the RabbitMQ queues and the outbox. At the
end the pipeline is left to drain, and every message stored during the run must have been counted
by analytics exactly once.

Verdicts (`Series.verdict`): the first sample is taken before any traffic, and the first third of
the samples is the warm-up. A count (connections, descriptors, threads, keys) is flat when its
maximum after the warm-up is at most the warm-up's maximum plus a small slack; a process's
connections must also stay within the bound docs/architecture.md states for it
(`connection_bound`), whatever the warm-up did. A memory figure is flat when the last third's
maximum is less than 10% above the middle third's; a backlog (queues, outbox) when the last
third's maximum is at most the first third's plus a slack. Connections, descriptors and memory of
the processes decide the outcome. A run shorter than MIN_MINUTES cannot tell a warm-up from growth.

The sockets behave as the page does: a message counts as acknowledged when its sender gets it back
(its `client_id`), and every mention notification pushed to a socket is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode, urlsplit
from urllib.request import HTTPCookieProcessor, ProxyHandler, Request, build_opener

import environ
import psutil
import redis
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connection
from django.db.models import Count, Max
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from analytics.models import ProcessedEvent
from analytics.selectors import room_message_count
from bench import loadtest
from bench.procfile import serving_processes
from chat.consumers import WRITE_THREADS
from chat.models import Message, NotificationDelivery, Room
from chat.protocol import TYPE_ERROR, TYPE_MESSAGE, TYPE_NOTIFICATION, TYPE_NOTIFICATION_ACK
from infrastructure.database_threads import DatabaseThreadPool
from messaging.topology import declared_queues
from monitoring.selectors import (
    SourceUnavailable,
    outbox_backlog,
    queue_stats,
)

PREFIX = "soak-"
# Words of each Procfile process's command line that tell it apart from the others
# (tests/chat/test_soak.py checks them against the Procfile); all but lb's, HAProxy, which runs
# none of this project's code and holds no database session.
PROCESS_SIGNATURES: dict[str, tuple[str, ...]] = {
    "web": ("chatproject.serve",),
    "worker": ("-Q", "analytics"),
    "relay": ("run_relay",),
    "notifier": ("-Q", "notifications"),
    "notifier_vip": ("-Q", "notifications_vip"),
    "dlq_archiver": ("run_dlq_archiver",),
    "monitor": ("-Q", "monitoring"),
    "beat": ("chatproject", "beat"),
}
SHELLS = {"sh", "bash", "dash", "zsh"}
# Traffic: sockets per run and their pace (well under the per-user rate limit), HTTP clients.
SOCKET_CLIENTS = 12
SOCKET_MESSAGES_PER_SECOND = 0.5
HTTP_CLIENTS = 3
HTTP_REQUESTS_PER_SECOND = 2.0
# A socket sends this many messages, then drops (half close cleanly, half lose the TCP
# connection) and reconnects; an HTTP client logs out and in again after this many requests.
MESSAGES_PER_SOCKET_LIFE = (4, 12)
REQUESTS_PER_LOGIN = 30
MENTION_SHARE = 0.2
# The shortest run whose warm-up (a third of it) lets every pool reach its working size.
MIN_MINUTES = 1.0
# How long the pipeline may take to drain after the traffic stops.
DRAIN_SECONDS = 120.0
# Slack of the "flat" rules, per kind of figure.
COUNT_SLACK = {"db connections": 2, "open fds": 16, "threads": 4}
MEMORY_GROWTH_LIMIT = 0.10
BACKLOG_SLACK = 50
MiB = 1024 * 1024

ProgressCallback = Callable[[float, float, str], None]


class SoakError(Exception):
    """The run cannot start; the message is one sentence for the operator."""


# --- The processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatProcess:
    """One Procfile process (`name`) by its main pid; its children (a Celery pool) belong to it."""

    name: str
    pid: int

    def members(self) -> list[psutil.Process]:
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def connection_bound(self) -> int:
        """The most PostgreSQL connections it may hold; NoSuchProcess when it is gone."""
        return connection_bound(self.name.split("#")[0], psutil.Process(self.pid).cmdline())


def _option_value(cmdline: list[str], *names: str) -> str | None:
    """The last value given to any of `names` (`-c 2`, `--concurrency 2`, `--concurrency=2`)."""
    value = None
    for i, word in enumerate(cmdline):
        if word in names and i + 1 < len(cmdline):
            value = cmdline[i + 1]
        elif word.startswith("--") and word.partition("=")[0] in names:
            value = word.partition("=")[2]
    return value


def connection_bound(name: str, cmdline: list[str]) -> int:
    """The bound of docs/architecture.md's table for Procfile process `name`, from the settings
    and the command line it derives from: web WEB_HTTP_THREADS + the socket write threads + 1,
    a Celery worker its --concurrency + 1 (1 with --pool solo)."""
    if name == "web":
        return settings.WEB_HTTP_THREADS + WRITE_THREADS + 1
    if name in ("worker", "notifier", "notifier_vip", "monitor"):
        if _option_value(cmdline, "-P", "--pool") == "solo":
            return 1
        concurrency = _option_value(cmdline, "-c", "--concurrency")
        return (int(concurrency) if concurrency else os.cpu_count() or 1) + 1
    return {"relay": 2, "dlq_archiver": 1, "beat": 0}[name]


def _database_identity(db: dict[str, Any]) -> tuple[str, int]:
    return db["NAME"], int(db.get("PORT") or 5432)


def _process_database(process: psutil.Process) -> tuple[str, int]:
    """The (database name, port) a process of this project uses, from its DATABASE_URL."""
    url = process.environ().get("DATABASE_URL") or settings.DEFAULT_DATABASE_URL
    return _database_identity(environ.Env.db_url_config(url))


def _has_words(cmdline: list[str], words: tuple[str, ...]) -> bool:
    return any(tuple(cmdline[i : i + len(words)]) == words for i in range(len(cmdline)))


def chat_processes_find(*, web_port: int, given: dict[str, int] | None = None) -> list[ChatProcess]:
    """The Procfile's processes on this machine that use this process's database.

    Matched by each command line's signature (PROCESS_SIGNATURES) and the database of its
    DATABASE_URL; the web processes also by serving `web_port`, themselves or behind the load
    balancer listening there. `given` (name -> pid) replaces the discovery of those names. Shell
    wrappers (honcho's `sh -c`) and pool children are not listed apart.
    """
    given = dict(given or {})
    web_pids = set(serving_processes(web_port)[1].values())
    ours = _database_identity(connection.settings_dict)
    matches: dict[str, list[psutil.Process]] = {name: [] for name in PROCESS_SIGNATURES}
    for process in psutil.process_iter(["cmdline", "name"]):
        cmdline = process.info["cmdline"] or []
        if not cmdline or process.info["name"] in SHELLS:
            continue
        for name, words in PROCESS_SIGNATURES.items():
            if name in given or not _has_words(cmdline, words):
                continue
            with contextlib.suppress(psutil.Error, ValueError, environ.ImproperlyConfigured):
                if name == "web" and process.pid not in web_pids:
                    continue
                if _process_database(process) == ours:
                    matches[name].append(process)
    found = [ChatProcess(name, pid) for name, pid in given.items()]
    for name, processes in matches.items():
        pids = {p.pid for p in processes}
        roots = sorted(p.pid for p in processes if p.ppid() not in pids)
        found += [ChatProcess(name if i == 0 else f"{name}#{i + 1}", pid) for i, pid in enumerate(roots)]
    return sorted(found, key=lambda p: (list(PROCESS_SIGNATURES).index(p.name.split("#")[0]), p.name))


def database_client_ports() -> set[int]:
    """Client ports of every TCP connection to this database (pg_stat_activity), this one's included."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT client_port FROM pg_stat_activity "
            "WHERE datname = current_database() AND client_port IS NOT NULL"
        )
        return {port for (port,) in cursor.fetchall()}


def process_database_connections(process: ChatProcess, *, client_ports: set[int]) -> int:
    """How many of `client_ports` (the database's sessions) belong to `process` and its children.

    PostgreSQL reports each session's client port; the process's own TCP sockets to the database
    port have those as their local ports. Connections over a Unix socket are not seen.
    """
    db_port = _database_identity(connection.settings_dict)[1]
    ports = set()
    for member in process.members():
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in member.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == db_port:
                    ports.add(conn.laddr.port)
    return len(ports & client_ports)


@dataclass(frozen=True)
class ProcessSample:
    db_connections: int
    rss_bytes: int
    open_fds: int
    threads: int


def process_sample(process: ChatProcess, *, client_ports: set[int]) -> ProcessSample:
    """The process's figures, summed over its children; NoSuchProcess when it is gone."""
    rss = fds = threads = 0
    for member in process.members():
        with contextlib.suppress(psutil.NoSuchProcess):
            with member.oneshot():
                rss += member.memory_info().rss
                fds += member.num_fds()
                threads += member.num_threads()
    return ProcessSample(process_database_connections(process, client_ports=client_ports), rss, fds, threads)


# --- Figures and verdicts -------------------------------------------------------------------


@dataclass
class Series:
    """One figure sampled over the run, and how to judge it: `rule` is count, memory or backlog;
    `bound`, when known, is the most the figure may ever reach (a process's connections)."""

    name: str
    rule: str
    decides: bool
    values: list[float] = field(default_factory=list)
    slack: float = 0.0
    bound: float | None = None

    def _thirds(self) -> tuple[list[float], list[float], list[float]]:
        n = len(self.values)
        third = n // 3
        return self.values[:third], self.values[third : n - third], self.values[n - third :]

    def baseline(self) -> float | None:
        """What the verdict compares the rest of the run with: the warm-up's maximum (memory:
        the middle third's); None with fewer than 3 samples."""
        if len(self.values) < 3:
            return None
        warmup, middle, _last = self._thirds()
        return max(middle) if self.rule == "memory" else max(warmup)

    def verdict(self) -> str:
        """ "flat", "growing", "over its bound", or "too short" (fewer than 3 samples)."""
        if self.bound is not None and self.values and max(self.values) > self.bound:
            return "over its bound"
        if len(self.values) < 3:
            return "too short"
        warmup, middle, last = self._thirds()
        if self.rule == "memory":
            # A fresh process's memory climbs through its warm-up (imports, caches, the young
            # generation the web process lets grow before collecting): judged after it.
            grew = max(last) > max(middle) * (1 + MEMORY_GROWTH_LIMIT)
        elif self.rule == "backlog":
            grew = max(last) > max(warmup) + self.slack
        else:
            grew = max(middle + last) > max(warmup) + self.slack
        return "growing" if grew else "flat"

    def summary(self) -> dict[str, Any]:
        scale = MiB if self.rule == "memory" else 1

        def shown(value: float | None) -> float | None:
            return None if value is None else round(value / scale, 1)

        baseline = self.baseline()
        return {
            "name": self.name,
            "before_traffic": shown(self.values[0]) if self.values else None,
            "baseline": shown(baseline),
            "end": shown(self.values[-1]) if self.values else None,
            "max": shown(max(self.values)) if self.values else None,
            "bound": self.bound,
            "unit": "MiB" if self.rule == "memory" else "",
            "verdict": self.verdict(),
            "decides": self.decides,
            "values": self.values,
        }


@dataclass
class SoakReport:
    minutes: float
    processes: list[ChatProcess]
    series: dict[str, Series] = field(default_factory=dict)
    traffic: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    stored: int = 0
    counted_once: int = 0
    not_counted: int = 0
    counted_twice: int = 0
    aggregate_delta: int = 0
    pending_at_end: dict[str, int] = field(default_factory=dict)
    drain_seconds: float = 0.0
    # Messages whose socket dropped before they came back, and how many of them were stored anyway.
    unacknowledged_ids: list[str] = field(default_factory=list)
    unacknowledged_stored: int = 0
    # The mention notifications of the run by outcome (NotificationDelivery, after the drain).
    notifications: dict[str, int] = field(default_factory=dict)

    def record(
        self,
        name: str,
        value: float,
        *,
        rule: str,
        decides: bool,
        slack: float = 0.0,
        bound: float | None = None,
    ) -> None:
        series = self.series.setdefault(name, Series(name, rule, decides, slack=slack, bound=bound))
        series.values.append(value)

    @property
    def growing(self) -> list[str]:
        return [s.name for s in self.series.values() if s.decides and s.verdict() != "flat"]

    @property
    def counted_exactly_once(self) -> bool:
        return (
            self.not_counted == 0
            and self.counted_twice == 0
            and self.counted_once == self.stored
            and self.aggregate_delta == self.stored
        )

    @property
    def ok(self) -> bool:
        return not self.growing and self.counted_exactly_once and not any(self.pending_at_end.values())

    def summary(self) -> dict[str, Any]:
        return {
            "minutes": self.minutes,
            "processes": {p.name: p.pid for p in self.processes},
            "samples": self.samples,
            "series": [s.summary() for s in self.series.values()],
            "traffic": dict(self.traffic),
            "errors": dict(self.errors),
            "stored_messages": self.stored,
            "counted_once": self.counted_once,
            "not_counted": self.not_counted,
            "counted_twice": self.counted_twice,
            "aggregate_delta": self.aggregate_delta,
            "pending_at_end": self.pending_at_end,
            "drain_seconds": round(self.drain_seconds, 1),
            "unacknowledged_stored": self.unacknowledged_stored,
            "notifications": self.notifications,
            "growing": self.growing,
            "ok": self.ok,
        }


class Sampler:
    """Takes one sample of every figure into a report (runs on a thread that may use the ORM)."""

    def __init__(self, report: SoakReport) -> None:
        self.report = report
        self.redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)
        self.queues = declared_queues()
        self.bounds: dict[str, int] = {}
        for process in report.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.bounds[process.name] = process.connection_bound()

    def sample(self) -> str:
        """Record every figure once; returns a short line for the progress display."""
        report = self.report
        client_ports = database_client_ports()
        report.record("database sessions (all clients)", len(client_ports), rule="count", decides=False)
        line = []
        for process in report.processes:
            try:
                figures = process_sample(process, client_ports=client_ports)
            except psutil.NoSuchProcess:
                report.errors[f"{process.name} exited"] += 1
                continue
            record = report.record
            record(
                f"{process.name} db connections",
                figures.db_connections,
                rule="count",
                decides=True,
                slack=COUNT_SLACK["db connections"],
                bound=self.bounds.get(process.name),
            )
            record(f"{process.name} rss", figures.rss_bytes, rule="memory", decides=True)
            record(
                f"{process.name} open fds",
                figures.open_fds,
                rule="count",
                decides=True,
                slack=COUNT_SLACK["open fds"],
            )
            record(
                f"{process.name} threads",
                figures.threads,
                rule="count",
                decides=False,
                slack=COUNT_SLACK["threads"],
            )
            if process.name == "web":
                line.append(f"web {figures.db_connections} conns {figures.rss_bytes / MiB:.0f} MiB")
        keys = sum(1 for _ in self.redis.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*", count=1000))
        report.record(
            "redis keys (this prefix)", keys, rule="count", decides=False, slack=max(10, keys // 10)
        )
        report.record(
            "redis memory (server)", self.redis.info("memory")["used_memory"], rule="memory", decides=False
        )
        pending = outbox_backlog().pending
        report.record("outbox pending", pending, rule="backlog", decides=False, slack=BACKLOG_SLACK)
        try:
            for stat in queue_stats(queues=self.queues):
                report.record(
                    f"queue {stat.name}", stat.messages, rule="backlog", decides=False, slack=BACKLOG_SLACK
                )
        except SourceUnavailable as error:
            report.errors[str(error)] += 1
        report.samples += 1
        sent, acknowledged = report.traffic["messages sent"], report.traffic["messages acknowledged"]
        return ", ".join([*line, f"outbox {pending}", f"messages sent {sent} (acknowledged {acknowledged})"])

    def close(self) -> None:
        self.redis.close()


# --- Traffic ---------------------------------------------------------------------------------


class HttpSession:
    """A browser-like HTTP client of the chat: cookies, CSRF token, logins (blocking calls)."""

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.cookies = CookieJar()
        self._opener = build_opener(ProxyHandler({}), HTTPCookieProcessor(self.cookies))

    def _cookie(self, name: str) -> str | None:
        return next((c.value for c in self.cookies if c.name == name), None)

    def request(self, path: str, *, form: dict[str, str] | None = None) -> int:
        """GET `path`, or POST `form` with the CSRF token; the final status after redirects."""
        data = None
        if form is not None:
            data = urlencode({**form, "csrfmiddlewaretoken": self._cookie(settings.CSRF_COOKIE_NAME) or ""})
        request = Request(self.base_url + path, data=data.encode() if data else None)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
                return response.status
        except HTTPError as error:
            error.close()
            return error.code

    def login(self, username: str, password: str) -> bool:
        """Log in through the login form; True when the server started a session."""
        self.request(settings.LOGIN_URL)
        self.request(settings.LOGIN_URL, form={"username": username, "password": password})
        return self._cookie(settings.SESSION_COOKIE_NAME) is not None

    def logout(self) -> int:
        return self.request("/accounts/logout/", form={})


def soak_users_ensure(*, count: int, kind: str) -> list[AbstractBaseUser]:
    """`count` users named soak-<kind>-NNNN, created once and reused (no usable password yet)."""
    return loadtest.loadtest_users_ensure(count=count, prefix=f"{PREFIX}{kind}-")


def soak_passwords_set(*, users: list[AbstractBaseUser]) -> dict[str, str]:
    """A fresh random password per user for this run (made unusable again by soak_passwords_clear)."""
    passwords = {}
    for user in users:
        passwords[user.get_username()] = secrets.token_urlsafe(16)
        user.set_password(passwords[user.get_username()])
        user.save(update_fields=["password"])
    return passwords


def soak_passwords_clear(*, users: list[AbstractBaseUser]) -> None:
    for user in users:
        user.set_unusable_password()
        user.save(update_fields=["password"])


class Traffic:
    """The run's clients; each loops until `stop` is set and counts what it did in the report."""

    def __init__(self, report: SoakReport, target: loadtest.Target, stop: asyncio.Event) -> None:
        self.report = report
        self.target = target
        self.stop = stop

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def http_client(self, username: str, password: str, rooms: list[str]) -> None:
        traffic = self.report.traffic
        while not self.stop.is_set():
            session = HttpSession(self.target.http_url)
            if not await asyncio.to_thread(session.login, username, password):
                self.report.errors["login failed"] += 1
                await self._pause(1.0)
                continue
            traffic["logins"] += 1
            for _ in range(REQUESTS_PER_LOGIN):
                if self.stop.is_set():
                    break
                room = random.choice(rooms)
                path, kind = random.choice(
                    [
                        ("/", "page views"),
                        (f"/rooms/{room}/", "page views"),
                        (f"/api/rooms/{room}/messages", "history API"),
                        ("/healthz", "health checks"),
                    ]
                )
                try:
                    status = await asyncio.to_thread(session.request, path)
                except (URLError, OSError) as error:
                    self.report.errors[f"HTTP {type(error).__name__}"] += 1
                    continue
                traffic[kind] += 1
                if status != 200:
                    self.report.errors[f"HTTP {status} on {kind}"] += 1
                await self._pause(random.uniform(0.5, 1.5) / HTTP_REQUESTS_PER_SECOND)
            status = await asyncio.to_thread(session.logout)
            traffic["logouts"] += 1
            if status != 200:
                self.report.errors[f"HTTP {status} on logout"] += 1

    async def socket_client(self, client: loadtest.LoadClient, mentionable: list[str]) -> None:
        traffic = self.report.traffic
        while not self.stop.is_set():
            ws = await loadtest.client_socket_open(self.target, client, self.report.errors)
            if ws is None:
                await self._pause(1.0)
                continue
            traffic["socket connects"] += 1
            awaiting: set[str] = set()  # client_ids sent on this socket and not yet back or refused
            reader = asyncio.create_task(self._read(ws, awaiting))
            try:
                for _ in range(random.randint(*MESSAGES_PER_SOCKET_LIFE)):
                    await self._pause(random.uniform(0.5, 1.5) / SOCKET_MESSAGES_PER_SECOND)
                    if self.stop.is_set():
                        break
                    text = f"soak message {uuid.uuid4().hex[:8]}"
                    if random.random() < MENTION_SHARE:
                        text += f" for @{random.choice(mentionable)}"
                        traffic["mentions"] += 1
                    client_id = str(uuid.uuid4())
                    awaiting.add(client_id)
                    await ws.send(json.dumps({"type": TYPE_MESSAGE, "text": text, "client_id": client_id}))
                    traffic["messages sent"] += 1
            except ConnectionClosed:
                self.report.errors["socket closed by the server"] += 1
            # Half the sockets say goodbye, half vanish as a lost network would.
            if random.random() < 0.5:
                await ws.close()
            else:
                ws.transport.abort()
            traffic["socket drops"] += 1
            await asyncio.gather(reader, return_exceptions=True)
            # In flight when the socket dropped: stored or not, the sender never learnt which.
            traffic["messages unacknowledged"] += len(awaiting)
            self.report.unacknowledged_ids += awaiting

    async def _read(self, ws: ClientConnection, awaiting: set[str]) -> None:
        """Like the page: a message back with a client_id sent here acknowledges it; every
        notification frame is acknowledged."""
        traffic = self.report.traffic
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == TYPE_ERROR:
                    self.report.errors[f"error frame: {frame.get('code')}"] += 1
                    if frame.get("client_id") in awaiting:
                        awaiting.discard(frame["client_id"])
                        traffic["messages refused"] += 1
                    continue
                traffic[f"frames received: {kind}"] += 1
                if kind == TYPE_MESSAGE and frame.get("client_id") in awaiting:
                    awaiting.discard(frame["client_id"])
                    traffic["messages acknowledged"] += 1
                elif kind == TYPE_NOTIFICATION:
                    traffic["notifications pushed"] += 1
                    await ws.send(json.dumps({"type": TYPE_NOTIFICATION_ACK, "id": frame["id"]}))
                    traffic["notifications acknowledged"] += 1


# --- The run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What the database held before the run: the last message id and the soak rooms' counts."""

    last_message_id: int
    counted_by_room: dict[int, int]


def soak_baseline(*, rooms: list[Room]) -> Baseline:
    last = Message.objects.aggregate(last=Max("id"))["last"] or 0
    return Baseline(last, {room.pk: room_message_count(room_id=room.pk) for room in rooms})


def counted_exactly_once_check(*, report: SoakReport, rooms: list[Room], baseline: Baseline) -> None:
    """Fill in the report: messages stored in the soak rooms during the run and how analytics counted them."""
    ids = list(
        Message.objects.filter(room__in=rooms, id__gt=baseline.last_message_id).values_list("id", flat=True)
    )
    times = Counter(
        dict(
            ProcessedEvent.objects.filter(message_id__in=ids)
            .values_list("message_id")
            .annotate(n=Count("event_id"))
            .values_list("message_id", "n")
        )
    )
    report.stored = len(ids)
    report.counted_once = sum(1 for i in ids if times[i] == 1)
    report.not_counted = sum(1 for i in ids if times[i] == 0)
    report.counted_twice = sum(1 for i in ids if times[i] > 1)
    report.aggregate_delta = sum(
        room_message_count(room_id=room.pk) - baseline.counted_by_room[room.pk] for room in rooms
    )


def unacknowledged_stored_count(*, client_ids: list[str]) -> int:
    """How many of the messages whose socket dropped before they came back were stored anyway."""
    return sum(
        Message.objects.filter(client_id__in=client_ids[start : start + 1000]).count()
        for start in range(0, len(client_ids), 1000)
    )


def notification_outcomes(*, rooms: list[Room], baseline: Baseline) -> dict[str, int]:
    """The run's mention notifications (those of messages stored in the soak rooms) by outcome."""
    deliveries = NotificationDelivery.objects.filter(
        message__room__in=rooms, message_id__gt=baseline.last_message_id
    )
    return {
        "acknowledged on a socket": deliveries.filter(
            channel=NotificationDelivery.CHANNEL_SOCKET, delivered_at__isnull=False
        ).count(),
        "awaiting acknowledgement": deliveries.filter(delivered_at__isnull=True).count(),
        "emailed": deliveries.filter(channel=NotificationDelivery.CHANNEL_EMAIL).count(),
        "nothing to send to": deliveries.filter(channel=NotificationDelivery.CHANNEL_NONE).count(),
    }


def pending_now(*, queues: tuple) -> dict[str, int]:
    pending = {"outbox": outbox_backlog().pending}
    with contextlib.suppress(SourceUnavailable):
        pending.update({f"queue {s.name}": s.messages for s in queue_stats(queues=queues)})
    return pending


def pipeline_drain(*, report: SoakReport, rooms: list[Room], baseline: Baseline) -> None:
    """Wait (at most DRAIN_SECONDS) until nothing is pending and every stored message is counted."""
    started = time.monotonic()
    queues = declared_queues()
    while True:
        counted_exactly_once_check(report=report, rooms=rooms, baseline=baseline)
        report.pending_at_end = pending_now(queues=queues)
        settled = report.counted_exactly_once and not any(report.pending_at_end.values())
        if settled or time.monotonic() - started > DRAIN_SECONDS:
            break
        time.sleep(1.0)
    report.drain_seconds = time.monotonic() - started
    report.unacknowledged_stored = unacknowledged_stored_count(client_ids=report.unacknowledged_ids)
    report.notifications = notification_outcomes(rooms=rooms, baseline=baseline)


def sample_interval(seconds: float) -> float:
    """About 30 samples in a short run, one every 10 s in a long one."""
    return min(10.0, max(2.0, seconds / 30))


async def _traffic_and_samples(
    report: SoakReport,
    target: loadtest.Target,
    *,
    seconds: float,
    logins: dict[str, str],
    clients: list[loadtest.LoadClient],
    rooms: list[str],
    mentionable: list[str],
    progress: ProgressCallback | None,
) -> None:
    stop = asyncio.Event()
    traffic = Traffic(report, target, stop)
    # The ORM and psutil block; one thread of their own does every sample (and closes its connection).
    sampling = DatabaseThreadPool(size=1, name="soak-sample", idle_seconds=60.0)
    loop = asyncio.get_running_loop()
    sampler: Sampler | None = None
    tasks: list[asyncio.Task] = []
    try:
        sampler = await loop.run_in_executor(sampling, Sampler, report)
        # The first sample is the processes before any traffic; the clock starts after it.
        line = await loop.run_in_executor(sampling, sampler.sample)
        tasks = [asyncio.create_task(traffic.http_client(name, pw, rooms)) for name, pw in logins.items()]
        tasks += [asyncio.create_task(traffic.socket_client(c, mentionable)) for c in clients]
        started = time.monotonic()
        interval = sample_interval(seconds)
        while True:
            elapsed = time.monotonic() - started
            if progress:
                progress(min(elapsed, seconds), seconds, line)
            if elapsed >= seconds:
                break
            await asyncio.sleep(min(interval, seconds - elapsed))
            line = await loop.run_in_executor(sampling, sampler.sample)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if sampler is not None:
            await loop.run_in_executor(sampling, sampler.close)
        sampling.shutdown()


def soak_minutes_check(*, minutes: float) -> None:
    """SoakError when a run of `minutes` would be too short to judge."""
    if minutes < MIN_MINUTES:
        raise SoakError(
            f"--minutes must be at least {MIN_MINUTES:g}: a shorter run cannot tell a warm-up from growth."
        )


def soak_run(
    *,
    target: loadtest.Target,
    processes: list[ChatProcess],
    minutes: float,
    progress: ProgressCallback | None = None,
) -> SoakReport:
    """Run the traffic for `minutes` while sampling `processes`, drain, and check the counts.

    Never raises for what the server does: failures are counted in `report.errors`, and the
    verdicts and checks are in the report. Soak users get a fresh password for the run only.
    SoakError, before anything runs, when `minutes` is under MIN_MINUTES.
    """
    soak_minutes_check(minutes=minutes)
    report = SoakReport(minutes=minutes, processes=processes)
    socket_users = soak_users_ensure(count=SOCKET_CLIENTS, kind="user")
    login_users = soak_users_ensure(count=HTTP_CLIENTS, kind="login")
    rooms = loadtest.loadtest_rooms_ensure(count=3, prefix=f"{PREFIX}room-", title="Soak")
    slugs = [room.slug for room in rooms]
    session_keys = loadtest.loadtest_sessions_create(users=socket_users)
    clients = [
        loadtest.LoadClient(room=slugs[i % len(slugs)], session_key=key) for i, key in enumerate(session_keys)
    ]
    # Mentions reach soak users with and without a socket (pushed, or mailed).
    mentionable = [u.get_username() for u in socket_users + login_users]
    baseline = soak_baseline(rooms=rooms)
    logins = soak_passwords_set(users=login_users)
    try:
        asyncio.run(
            _traffic_and_samples(
                report,
                target,
                seconds=minutes * 60,
                logins=logins,
                clients=clients,
                rooms=slugs,
                mentionable=mentionable,
                progress=progress,
            )
        )
    finally:
        soak_passwords_clear(users=login_users)
        loadtest.loadtest_sessions_delete(session_keys=session_keys)
    pipeline_drain(report=report, rooms=rooms, baseline=baseline)
    return report


def web_port(target: loadtest.Target) -> int:
    parts = urlsplit(target.http_url)
    return parts.port or (443 if parts.scheme == "https" else 80)
