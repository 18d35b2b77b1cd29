"""A web process's PostgreSQL connections stay within the bound docs/architecture.md states."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from bench.loadtest import LoadClient, Target, client_socket_open
from bench.procfile import DaphneServer, free_port
from bench.soak import ChatProcess, HttpSession, database_client_ports, process_database_connections
from chat.consumers import WRITE_THREADS
from infrastructure.database_threads import DatabaseThreadPool
from tests.conftest import session_cookie
from tests.harness import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# HTTP threads, socket write threads, and asgiref's one thread for the sockets' handshake reads.
WEB_CONNECTION_BOUND = settings.WEB_HTTP_THREADS + WRITE_THREADS + 1
HTTP_REQUESTS = 300
HTTP_CLIENTS = 10
SOCKET_CONNECTS = 50
PASSWORD = "pw-for-tests-1"


class PeakConnections:
    """Counts the web process's database connections every 0.1 s, on a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.process = ChatProcess("web", pid)
        self.peak = 0
        self.final = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def count(self) -> int:
        return process_database_connections(self.process, client_ports=database_client_ports())

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, self.count())
            self.final = self.count()
        finally:
            connection.close()

    def __enter__(self) -> PeakConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def browse(server_url: str, username: str, requests: int) -> list[int]:
    """Log in through the form, make `requests` page, API and health requests, log out; the statuses."""
    session = HttpSession(server_url)
    assert session.login(username, PASSWORD), f"{username} could not log in"
    paths = ["/", "/rooms/general/", "/api/rooms/general/messages", "/healthz"]
    statuses = [session.request(paths[i % len(paths)]) for i in range(requests)]
    statuses.append(session.logout())
    return statuses


async def connect_send_close(server_url: str, cookies: list[str]) -> int:
    """Open a socket per cookie in turn, send one message on it, close it; how many were acknowledged."""
    acknowledged = 0
    target = Target(server_url)
    for cookie in cookies:
        errors: Counter[str] = Counter()
        ws = await client_socket_open(target, LoadClient(room="general", session_key=cookie), errors)
        assert ws is not None, errors
        client_id = str(uuid.uuid4())
        await ws.send(json.dumps({"type": "message", "text": "hello", "client_id": client_id}))
        async with asyncio.timeout(10):
            async for raw in ws:
                if json.loads(raw).get("client_id") == client_id:
                    acknowledged += 1
                    break
        await ws.close()
    return acknowledged


async def test_http_requests_and_socket_connects_leave_the_web_process_within_its_bound(
    live_daphne, make_user, make_room
):
    await sync_to_async(make_room)("general")
    users = [await sync_to_async(make_user)(f"reader{i}") for i in range(HTTP_CLIENTS)]
    cookies = [await sync_to_async(session_cookie)(users[i % len(users)]) for i in range(SOCKET_CONNECTS)]
    per_client = HTTP_REQUESTS // HTTP_CLIENTS

    with PeakConnections(live_daphne.pid) as connections:
        with ThreadPoolExecutor(HTTP_CLIENTS) as pool:
            browsing = [
                asyncio.wrap_future(pool.submit(browse, live_daphne.http_url, user.username, per_client))
                for user in users
            ]
            acknowledged = await connect_send_close(live_daphne.http_url, cookies)
            statuses = [status for result in await asyncio.gather(*browsing) for status in result]

    assert connections.peak <= WEB_CONNECTION_BOUND, f"peak {connections.peak}, bound {WEB_CONNECTION_BOUND}"
    assert connections.final <= WEB_CONNECTION_BOUND
    assert acknowledged == SOCKET_CONNECTS
    assert statuses.count(200) == len(statuses) == HTTP_REQUESTS + HTTP_CLIENTS


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def backend_exists(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0] == 1


def test_a_database_thread_closes_its_connection_once_idle():
    pool = DatabaseThreadPool(size=1, name="test-idle", idle_seconds=0.5)
    try:
        pid = pool.submit(backend_pid).result()
        assert backend_exists(pid)

        wait_until(lambda: not backend_exists(pid), timeout=20, message="the idle thread's connection closed")
    finally:
        pool.shutdown()


def test_an_idle_web_process_closes_the_connections_its_requests_opened():
    server = DaphneServer(port=free_port(), extra_env={"DB_CONN_IDLE_SECONDS": "1"})
    server.start()
    try:
        web = ChatProcess("web", server.pid)
        session = HttpSession(server.http_url)
        assert [session.request("/healthz") for _ in range(30)] == [200] * 30

        wait_until(
            lambda: process_database_connections(web, client_ports=database_client_ports()) == 0,
            timeout=30,
            message="the web process closed its idle connections",
        )
    finally:
        server.stop()
