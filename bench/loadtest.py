"""Load tests of the room socket, driven by `manage.py loadtest` (docs/performance.md).

Real WebSocket clients (the `websockets` package) talk to a running web process exactly as
browsers do: session cookie, allowed Origin, JSON frames. Every sent message is timed from the
moment it leaves its client to the moment each other client of the room receives it; all clients
live in this one process, so one monotonic clock serves both ends.

Definitions used in the report:
- expected deliveries = messages sent x (C - 1) per room: every message must reach each other
  client of its room (the sender's own copy is its acknowledgement, counted apart);
- delivered % = distinct (message, receiving client) pairs seen / expected deliveries;
- persisted % = rows in PostgreSQL whose client_id is one of the sent messages / messages sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat.models import Message, Room

PREFIX = "loadtest-"
# Handshakes in flight at once: enough to connect 1000 sockets in seconds, few enough to stay
# inside the listen backlog of a single daphne.
CONNECT_CONCURRENCY = 100
# How long deliveries may trail the last send before they count as lost.
DRAIN_SECONDS = 10.0

ProgressCallback = Callable[[int, int], None]


class ServerUnreachable(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """Where the clients connect, and the Origin the server's ALLOWED_HOSTS must accept."""

    http_url: str

    @property
    def ws_url(self) -> str:
        parts = urlsplit(self.http_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}"

    @property
    def origin(self) -> str:
        parts = urlsplit(self.http_url)
        return f"{parts.scheme}://{parts.netloc}"

    def room_url(self, slug: str) -> str:
        return f"{self.ws_url}/ws/rooms/{slug}/"


@dataclass(frozen=True)
class LoadClient:
    """One socket to open: its room and the session it authenticates with."""

    room: str
    session_key: str


@dataclass
class LoadReport:
    rooms: int
    clients_per_room: int
    messages_per_client: int
    rate_per_client: float
    connected: int = 0
    sent: int = 0
    acked: int = 0
    expected_deliveries: int = 0
    delivered: int = 0
    duplicates: int = 0
    persisted: int = 0
    seconds: float = 0.0
    load_average: tuple[float, float] = (0.0, 0.0)
    latency_ms: list[float] = field(default_factory=list, repr=False)
    ack_latency_ms: list[float] = field(default_factory=list, repr=False)
    errors: Counter[str] = field(default_factory=Counter)
    # Each serving process's CPU while the clients sent (CpuMeter.stop), when the run measured it.
    process_cpu: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delivered_pct(self) -> float:
        return _pct(self.delivered, self.expected_deliveries)

    @property
    def persisted_pct(self) -> float:
        return _pct(self.persisted, self.sent)

    @property
    def deliveries_per_second(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain values for `--json` and for people."""
        return {
            "rooms": self.rooms,
            "clients_per_room": self.clients_per_room,
            "messages_per_client": self.messages_per_client,
            "rate_per_client": self.rate_per_client,
            "connected": self.connected,
            "sent": self.sent,
            "acked": self.acked,
            "expected_deliveries": self.expected_deliveries,
            "delivered": self.delivered,
            "delivered_pct": round(self.delivered_pct, 2),
            "duplicates": self.duplicates,
            "persisted": self.persisted,
            "persisted_pct": round(self.persisted_pct, 2),
            "seconds": round(self.seconds, 2),
            "deliveries_per_second": round(self.deliveries_per_second, 1),
            "latency_p50_ms": _percentile(self.latency_ms, 50),
            "latency_p99_ms": _percentile(self.latency_ms, 99),
            "latency_max_ms": _percentile(self.latency_ms, 100),
            "ack_p50_ms": _percentile(self.ack_latency_ms, 50),
            "ack_p99_ms": _percentile(self.ack_latency_ms, 99),
            "errors": dict(self.errors),
            "process_cpu": self.process_cpu,
            **_machine(self.load_average),
        }


@dataclass
class ConnectionsReport:
    requested: int
    connected: int = 0
    connect_seconds: float = 0.0
    open_after_hold: int = 0
    received_broadcast: int = 0
    hold_seconds: float = 0.0
    broadcast_ms: float | None = None
    rss_before_bytes: int | None = None
    rss_after_bytes: int | None = None
    load_average: tuple[float, float] = (0.0, 0.0)
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        per_socket = None
        if self.rss_before_bytes is not None and self.rss_after_bytes is not None and self.connected:
            per_socket = round((self.rss_after_bytes - self.rss_before_bytes) / self.connected)
        return {
            "requested": self.requested,
            "connected": self.connected,
            "connect_seconds": round(self.connect_seconds, 2),
            "open_after_hold": self.open_after_hold,
            "hold_seconds": self.hold_seconds,
            "received_broadcast": self.received_broadcast,
            "broadcast_ms": None if self.broadcast_ms is None else round(self.broadcast_ms, 1),
            "rss_before_bytes": self.rss_before_bytes,
            "rss_after_bytes": self.rss_after_bytes,
            "rss_per_socket_bytes": per_socket,
            "errors": dict(self.errors),
            **_machine(self.load_average),
        }


def _machine(load_average: tuple[float, float]) -> dict[str, Any]:
    # Client, server and databases share these cores: the figures only mean something next to
    # how busy the machine was (other processes included).
    return {"cpus": os.cpu_count(), "load_average_1min": {"start": load_average[0], "end": load_average[1]}}


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile, in the same unit as `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without float error
    return round(ordered[int(rank) - 1], 1)


# --- Database side: users, rooms, sessions ------------------------------------------------


def loadtest_users_ensure(*, count: int, prefix: str = f"{PREFIX}user-") -> list[AbstractBaseUser]:
    """`count` users named <prefix>NNNN (loadtest-user-NNNN), created once and reused by later runs.

    They have no usable password: they only ever log in through sessions made here.
    """
    user_model = get_user_model()
    names = [f"{prefix}{i:04d}" for i in range(count)]
    existing = set(user_model.objects.filter(username__in=names).values_list("username", flat=True))
    missing = []
    for name in names:
        if name not in existing:
            user = user_model(username=name)
            user.set_unusable_password()
            missing.append(user)
    user_model.objects.bulk_create(missing, ignore_conflicts=True)
    return list(user_model.objects.filter(username__in=names).order_by("username"))


def loadtest_rooms_ensure(
    *, count: int, prefix: str = f"{PREFIX}room-", title: str = "Load test"
) -> list[Room]:
    """`count` public rooms named <prefix>NN (loadtest-room-NN), created once and reused by later runs."""
    rooms = []
    for i in range(count):
        room, _ = Room.objects.get_or_create(slug=f"{prefix}{i:02d}", defaults={"name": f"{title} {i:02d}"})
        rooms.append(room)
    return rooms


def loadtest_sessions_create(*, users: list[AbstractBaseUser]) -> list[str]:
    """A logged-in session per user, the same as django.contrib.auth.login() would store."""
    store_class = _session_store_class()
    # The first backend that loads users, as Django's test client picks: axes' only refuses logins.
    backend = next(
        path for path in settings.AUTHENTICATION_BACKENDS if hasattr(load_backend(path), "get_user")
    )
    keys = []
    for user in users:
        session = store_class()
        session[SESSION_KEY] = user._meta.pk.value_to_string(user)
        session[BACKEND_SESSION_KEY] = backend
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        keys.append(session.session_key)
    return keys


def loadtest_sessions_delete(*, session_keys: list[str]) -> None:
    store_class = _session_store_class()
    for key in session_keys:
        store_class(session_key=key).delete()


def loadtest_data_delete() -> tuple[int, int]:
    """Delete every loadtest- room (with its messages) and user; returns (rooms, users) deleted."""
    with transaction.atomic():
        rooms = Room.objects.filter(slug__startswith=PREFIX)
        Message.objects.filter(room__in=rooms).delete()
        _, rooms_deleted = rooms.delete()
        user_model = get_user_model()
        _, users_deleted = user_model.objects.filter(username__startswith=PREFIX).delete()
    # delete() also counts what cascaded (memberships, sessions' users...); report only these.
    return rooms_deleted.get(Room._meta.label, 0), users_deleted.get(user_model._meta.label, 0)


def loadtest_persisted_count(*, client_ids: list[str], settle_seconds: float = 0.0) -> int:
    """How many of the messages sent with these client_ids are stored.

    With `settle_seconds`, counts again while the number still grows (a web process may still be
    working through frames it received before the clients closed), for at most that long.
    """
    deadline = time.monotonic() + settle_seconds
    stored = _stored_count(client_ids)
    while stored < len(client_ids) and time.monotonic() < deadline:
        time.sleep(1.0)
        again = _stored_count(client_ids)
        if again == stored:
            break
        stored = again
    return stored


def _stored_count(client_ids: list[str]) -> int:
    stored = 0
    # Chunks keep each IN list to a size PostgreSQL plans quickly.
    for start in range(0, len(client_ids), 1000):
        chunk = client_ids[start : start + 1000]
        stored += Message.objects.filter(client_id__in=chunk).count()
    return stored


def _session_store_class() -> type:
    return import_module(settings.SESSION_ENGINE).SessionStore


# --- Process side: reachability, file limits, memory -----------------------------------


def server_check(*, target: Target, timeout: float = 3.0) -> None:
    """Raise ServerUnreachable, with one sentence saying so, unless the server accepts TCP."""
    parts = urlsplit(target.http_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return
    except OSError as error:
        raise ServerUnreachable(
            f"The chat server at {target.http_url} cannot be reached ({error.strerror or error})."
        ) from None


def open_files_limit_raise(*, needed: int) -> int:
    """Raise this process's soft limit on open files towards `needed` (children inherit it).

    Returns the soft limit now in force, which is at most the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


@dataclass
class CpuMeter:
    """CPU time of local processes (name -> pid: the web processes, the load balancer) over a window."""

    processes: dict[str, int]
    _cpu_at_start: dict[str, float | None] = field(default_factory=dict)
    _started_at: float = 0.0

    def start(self) -> None:
        self._started_at = time.perf_counter()
        self._cpu_at_start = {name: process_cpu_seconds(pid) for name, pid in self.processes.items()}

    def stop(self) -> list[dict[str, Any]]:
        """Each process's CPU seconds since `start`, and the share of one core that was."""
        seconds = time.perf_counter() - self._started_at
        used = []
        for name, pid in self.processes.items():
            before, after = self._cpu_at_start.get(name), process_cpu_seconds(pid)
            cpu = None if before is None or after is None else after - before
            used.append(
                {
                    "name": name,
                    "pid": pid,
                    "cpu_seconds": None if cpu is None else round(cpu, 2),
                    "cpu_pct": None if cpu is None or not seconds else round(100 * cpu / seconds, 1),
                }
            )
        return used


def process_cpu_seconds(pid: int) -> float | None:
    """User and system CPU a local process has used so far, None when it is gone or not ours to read."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of a local process (Linux /proc), None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- The clients ---------------------------------------------------------------------------


async def client_socket_open(
    target: Target, client: LoadClient, errors: Counter[str]
) -> ClientConnection | None:
    """The client's socket, open; None (the failure counted in `errors`) when it cannot connect."""
    try:
        return await connect(
            target.room_url(client.room),
            origin=target.origin,
            additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={client.session_key}"},
            # Browsers offer deflate and daphne declines it; not offering it saves a round of
            # negotiation and keeps the client's CPU for the measurement.
            compression=None,
            proxy=None,
            open_timeout=30,
        )
    except Exception as error:  # every failure to connect is a result to report, not a crash
        errors[f"connect failed: {type(error).__name__}"] += 1
        return None


async def _open_sockets(
    target: Target, clients: list[LoadClient], errors: Counter[str]
) -> list[ClientConnection | None]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(client: LoadClient) -> ClientConnection | None:
        async with gate:
            return await client_socket_open(target, client, errors)

    return await asyncio.gather(*(open_one(client) for client in clients))


def _close_reason(ws: ClientConnection) -> str | None:
    """A label for a close the test did not ask for, or None."""
    code = ws.close_code
    if code is None or code == 1000:
        return None
    return f"closed {code}"


@dataclass
class _Sent:
    sender: int
    at: float


class _MessageLoad:
    """Book-keeping of one `load_run`: what was sent when, and who saw it."""

    def __init__(self, report: LoadReport, clients: list[LoadClient], progress: ProgressCallback | None):
        self.report = report
        self.clients = clients
        self.progress = progress
        self.sent: dict[str, _Sent] = {}
        self.seen: set[tuple[str, int]] = set()
        self.acked: set[str] = set()
        self.room_size = Counter(client.room for client in clients)
        self.all_in = asyncio.Event()
        self.sending_done = False

    def expect_more(self) -> bool:
        return len(self.seen) < self.report.expected_deliveries or len(self.acked) < self.report.sent

    def on_frame(self, receiver: int, raw: str | bytes) -> None:
        now = time.perf_counter()
        try:
            frame = json.loads(raw)
        except ValueError:
            self.report.errors["unparsable frame"] += 1
            return
        kind = frame.get("type")
        if kind == "error":
            self.report.errors[f"error frame: {frame.get('code')}"] += 1
            return
        if kind != "message":
            return
        client_id = frame.get("client_id")
        sent = self.sent.get(client_id)
        if sent is None:
            return  # someone else's message in the room, e.g. a person watching the test
        if sent.sender == receiver:
            if client_id not in self.acked:
                self.acked.add(client_id)
                self.report.ack_latency_ms.append((now - sent.at) * 1000)
        elif (client_id, receiver) in self.seen:
            self.report.duplicates += 1
        else:
            self.seen.add((client_id, receiver))
            self.report.latency_ms.append((now - sent.at) * 1000)
            if self.progress:
                self.progress(len(self.seen), self.report.expected_deliveries)
        if self.sending_done and not self.expect_more():
            self.all_in.set()

    async def read(self, receiver: int, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self.on_frame(receiver, raw)
        except ConnectionClosed:
            pass
        reason = _close_reason(ws)
        if reason:
            self.report.errors[reason] += 1

    async def send(self, index: int, ws: ClientConnection, messages: int, rate: float, start: float) -> None:
        # A random phase and jittered gaps, so that clients do not fire in lockstep.
        await asyncio.sleep(max(0.0, start - time.perf_counter()) + random.uniform(0, 1 / rate))
        for n in range(messages):
            client_id = str(uuid.uuid4())
            frame = {
                "type": "message",
                "text": f"load test message {n + 1} of client {index} ({client_id[:8]})",
                "client_id": client_id,
            }
            # Counted before the send: its first delivery may be read before the send returns, and
            # the progress total must already include it.
            deliveries = self.room_size[self.clients[index].room] - 1
            self.sent[client_id] = _Sent(sender=index, at=time.perf_counter())
            self.report.sent += 1
            self.report.expected_deliveries += deliveries
            try:
                await ws.send(json.dumps(frame))
            except ConnectionClosed:
                del self.sent[client_id]
                self.report.sent -= 1
                self.report.expected_deliveries -= deliveries
                return
            if n + 1 < messages:
                await asyncio.sleep(random.uniform(0.5, 1.5) / rate)


async def load_run(
    *,
    target: Target,
    clients: list[LoadClient],
    messages: int,
    rate: float,
    progress: ProgressCallback | None = None,
    cpu: CpuMeter | None = None,
) -> tuple[LoadReport, list[str]]:
    """Connect every client, let each send `messages` at `rate` per second, wait for deliveries.

    Returns the report (without `persisted`, which the caller counts in the database) and the
    client_ids sent. Never raises for what the server does: refusals, closes and error frames
    are counted in `report.errors`. With `cpu`, the serving processes' CPU from the first send
    to the last delivery is in `report.process_cpu`.
    """
    rooms = sorted({client.room for client in clients})
    report = LoadReport(
        rooms=len(rooms),
        clients_per_room=len(clients) // max(1, len(rooms)),
        messages_per_client=messages,
        rate_per_client=rate,
    )
    load = _MessageLoad(report, clients, progress)
    load_at_start = os.getloadavg()[0]
    sockets = await _open_sockets(target, clients, report.errors)
    report.connected = sum(1 for ws in sockets if ws is not None)
    readers = [
        asyncio.create_task(load.read(index, ws)) for index, ws in enumerate(sockets) if ws is not None
    ]
    try:
        start = time.perf_counter() + 0.2
        if cpu:
            cpu.start()
        await asyncio.gather(
            *(
                load.send(index, ws, messages, rate, start)
                for index, ws in enumerate(sockets)
                if ws is not None
            )
        )
        load.sending_done = True
        if load.expect_more():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.all_in.wait(), DRAIN_SECONDS)
        report.seconds = time.perf_counter() - start
        if cpu:
            report.process_cpu = cpu.stop()
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets if ws is not None), return_exceptions=True)
        await asyncio.gather(*readers, return_exceptions=True)
    report.acked = len(load.acked)
    report.delivered = len(load.seen)
    report.load_average = (load_at_start, os.getloadavg()[0])
    return report, list(load.sent)


async def connections_run(
    *,
    target: Target,
    clients: list[LoadClient],
    hold_seconds: float = 5.0,
    rss: Callable[[], int | None] | None = None,
    progress: ProgressCallback | None = None,
) -> ConnectionsReport:
    """Open every client's socket, hold them, then count who receives one broadcast message.

    `clients` are expected to share one room. `rss` reads the web process's memory, when the
    caller runs it.
    """
    report = ConnectionsReport(requested=len(clients), hold_seconds=hold_seconds)
    load_at_start = os.getloadavg()[0]
    report.rss_before_bytes = rss() if rss else None
    opened = 0

    async def open_counted(client: LoadClient, gate: asyncio.Semaphore) -> ClientConnection | None:
        nonlocal opened
        async with gate:
            ws = await client_socket_open(target, client, report.errors)
        opened += 1
        if progress:
            progress(opened, len(clients))
        return ws

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    started = time.perf_counter()
    sockets = [ws for ws in await asyncio.gather(*(open_counted(c, gate) for c in clients)) if ws]
    report.connect_seconds = time.perf_counter() - started
    report.connected = len(sockets)
    if not sockets:
        return report
    probe_id = str(uuid.uuid4())
    received: set[int] = set()
    everyone = asyncio.Event()
    sent_at = 0.0

    async def read(index: int, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "error":
                    report.errors[f"error frame: {frame.get('code')}"] += 1
                elif frame.get("client_id") == probe_id and index not in received:
                    received.add(index)
                    if len(received) == len(sockets):
                        report.broadcast_ms = (time.perf_counter() - sent_at) * 1000
                        everyone.set()
        except ConnectionClosed:
            pass
        reason = _close_reason(ws)
        if reason:
            report.errors[reason] += 1

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
    try:
        await asyncio.sleep(hold_seconds)
        report.open_after_hold = sum(1 for ws in sockets if ws.close_code is None)
        report.rss_after_bytes = rss() if rss else None
        sent_at = time.perf_counter()
        await sockets[0].send(
            json.dumps({"type": "message", "text": "load test: one to all", "client_id": probe_id})
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everyone.wait(), DRAIN_SECONDS)
        report.received_broadcast = len(received)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        await asyncio.gather(*readers, return_exceptions=True)
    report.load_average = (load_at_start, os.getloadavg()[0])
    return report
