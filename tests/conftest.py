"""Fixtures shared by the suite: users, rooms, session cookies, this run's vhost; the process
harness (a live daphne server, workers, the relay, the archiver) is tests/harness.py.

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
from django.core.management import call_command
from django.db import connection
from django.test import Client, override_settings

from chat import selectors
from chat.models import Room

pytest_plugins = ["tests.harness", "tests.scheduling"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    """A test database of this run's own, so that concurrent runs on one server do not collide."""
    test_settings = connection.settings_dict.setdefault("TEST", {})
    test_settings["NAME"] = f"test_{connection.settings_dict['NAME']}_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _redis_namespace_of_this_run() -> None:
    """This run's own Redis keys and channel-layer names (its children inherit them).

    Room and user ids start at 1 in every test database, so without it a concurrent run, or
    `make run` on the same Redis, could deliver frames to this run's sockets or spend its buckets.
    """
    from channels.layers import channel_layers

    prefix = f"test{os.getpid()}"
    settings.REDIS_KEY_PREFIX = prefix
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = f"{prefix}:asgi"
    channel_layers.backends.clear()


@pytest.fixture(scope="session", autouse=True)
def _child_processes_keep_mail_in_memory() -> Iterator[None]:
    """Child processes (daphne, workers) read EMAIL_URL from the environment they inherit, not
    pytest-django's locmem setting: without this they would use the SMTP default, or a developer's
    real EMAIL_URL. A test that reads their mail passes its own EMAIL_URL (filemail://)."""
    previous = os.environ.get("EMAIL_URL")
    os.environ["EMAIL_URL"] = "memorymail://"
    yield
    if previous is None:
        del os.environ["EMAIL_URL"]
    else:
        os.environ["EMAIL_URL"] = previous


@pytest.fixture(scope="session", autouse=True)
def _collected_static_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Static files collected as in production, into this run's own directory (children inherit it).

    With DEBUG off (as under pytest) pages name static files by their hashed names from
    collectstatic's manifest, and the web process serves only what was collected.
    """
    with override_settings(STATIC_ROOT=tmp_path_factory.mktemp("static")):
        call_command("collectstatic", interactive=False, verbosity=0)
        yield


@pytest.fixture(autouse=True)
def _fresh_rate_limits() -> None:
    """Rate-limit buckets live in Redis, keyed by user id; ids repeat across test databases."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(f"{settings.REDIS_KEY_PREFIX}:ratelimit:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(autouse=True)
def _fresh_vip_status() -> None:
    """VIP status is cached per process for a few seconds; tests change it and look at once."""
    selectors._vip_status.clear()


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


def grant_permission(user, permission: str) -> None:
    """Give `user` the permission "app_label.codename", as staff do in the admin's user page."""
    from django.contrib.auth.models import Permission

    app_label, _, codename = permission.partition(".")
    user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))


def site_origin() -> str:
    """An Origin the sockets accept in this process (in-process ASGI tests): the first configured one."""
    return settings.CHAT_ALLOWED_ORIGINS[0]


def session_cookie(user) -> str:
    """A `sessionid` value for `user`, as the browser would hold after logging in."""
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


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


# --- RabbitMQ: a vhost per test session ----------------------------------------------------------


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The URL of a RabbitMQ vhost of this test session's own, with the topology declared.

    Concurrent test runs on the shared broker each get their vhost, so their queues never mix.
    The Django setting and the Celery app point at it for the whole session.
    """
    from celery import current_app

    from messaging.topology import scratch_vhost

    previous = settings.CELERY_BROKER_URL
    with scratch_vhost(f"test_{os.getpid()}", broker_url=previous) as url:
        settings.CELERY_BROKER_URL = url
        current_app.conf.broker_url = url
        try:
            yield url
        finally:
            settings.CELERY_BROKER_URL = previous
            current_app.conf.broker_url = previous
