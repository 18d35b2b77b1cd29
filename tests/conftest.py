"""Fixtures shared by the suite: users, rooms, session cookies and a live daphne server.

Everything runs against the real PostgreSQL (pytest-django's test database) and Redis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from chat.models import Room
from chatproject.procfile import (  # noqa: F401  (re-exported for tests that import them from here)
    DaphneServer,
    child_process_env,
    free_port,
    procfile_command,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    """A test database of this run's own, so that concurrent runs on one server do not collide."""
    test_settings = connection.settings_dict.setdefault("TEST", {})
    test_settings["NAME"] = f"test_{connection.settings_dict['NAME']}_{os.getpid()}"


@pytest.fixture(autouse=True)
def _fresh_rate_limits() -> None:
    """Rate-limit buckets live in Redis, keyed by user id; ids repeat across test databases."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter("chat:ratelimit:*"))
    if keys:
        client.delete(*keys)
    client.close()


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


def test_database_env() -> dict[str, str]:
    """Environment for a child process that must see the test database."""
    return child_process_env()


@pytest.fixture
def live_daphne(transactional_db) -> Iterator[DaphneServer]:
    """A real daphne process serving the project against the test database."""
    server = DaphneServer(port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _close_stray_test_database_sessions(django_db_setup, django_db_blocker) -> Iterator[None]:
    """Let the test database be dropped at the end.

    Consumers write from executor threads whose persistent connections (CONN_MAX_AGE) outlive
    the test's event loop; they would keep the database "being accessed by other users".
    """
    yield
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
