"""Fixtures shared by the suite: users, rooms, session cookies and a live daphne server.

Everything runs against the real PostgreSQL (pytest-django's test database) and Redis.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from chat.models import Room
from chatproject.database import database_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_user(db) -> Callable[..., object]:
    def make(username: str, **extra: object):
        return get_user_model().objects.create_user(username, password="pw-for-tests-1", **extra)

    return make


@pytest.fixture
def make_room(db) -> Callable[..., Room]:
    def make(slug: str, *, is_private: bool = False, members: tuple = ()) -> Room:
        room = Room.objects.create(slug=slug, name=slug.title(), is_private=is_private)
        room.members.add(*members)
        return room

    return make


def session_cookie(user) -> str:
    """A `sessionid` value for `user`, as the browser would hold after logging in."""
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout}s")


def test_database_env() -> dict[str, str]:
    """Environment for a child process that must see the test database."""
    return {
        **os.environ,
        "DATABASE_URL": database_url(connection.settings_dict),
        "DJANGO_SETTINGS_MODULE": "chatproject.settings",
        "PYTHONUNBUFFERED": "1",
    }


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise KeyError(f"no {name!r} process in the Procfile")


@dataclass
class DaphneServer:
    port: int
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Run the Procfile's own web command, so the tests exercise its flags (frame limits)."""
        env = test_database_env()
        env.update(HOST="127.0.0.1", PORT=str(self.port))
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {procfile_command('web')}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def live_daphne(transactional_db) -> Iterator[DaphneServer]:
    """A real daphne process serving the project against the test database."""
    server = DaphneServer(port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
