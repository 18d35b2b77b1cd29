"""chatproject/settings.py: the environment's defaults, as issue 2 and the README state them."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

READ_SETTINGS = """
import django, json
django.setup()
from django.conf import settings as s
db = s.DATABASES["default"]
print(json.dumps({
    "database": [db["ENGINE"], db["USER"], db["HOST"], db["PORT"], db["NAME"]],
    "redis": s.REDIS_URL,
    "channel_layer_hosts": s.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"],
    "allowed_hosts": s.ALLOWED_HOSTS,
    "debug": s.DEBUG,
    "max_chars": s.CHAT_MAX_MESSAGE_CHARS,
    "rate": s.CHAT_RATE_PER_SECOND,
    "burst": s.CHAT_RATE_BURST,
    "site_url": s.SITE_URL,
}))
"""
VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "ALLOWED_HOSTS",
    "DEBUG",
    "CHAT_MAX_MESSAGE_CHARS",
    "CHAT_RATE_PER_SECOND",
    "CHAT_RATE_BURST",
    "SITE_URL",
    "SITE_SCHEME",
    "SITE_PORT",
    "PORT",
)


def settings_with(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    result = subprocess.run(
        [sys.executable, "-c", READ_SETTINGS],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "chatproject.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_defaults_when_the_environment_sets_nothing():
    assert settings_with() == {
        "database": ["django.db.backends.postgresql", "postgres", "localhost", 5432, "chat"],
        "redis": "redis://localhost:6379/0",
        "channel_layer_hosts": ["redis://localhost:6379/0"],
        "allowed_hosts": ["localhost", "127.0.0.1"],
        "debug": False,
        "max_chars": 4000,
        "rate": 5.0,
        "burst": 20,
        "site_url": "http://localhost:8000",
    }


def test_the_environment_overrides_every_default():
    values = settings_with(
        DATABASE_URL="postgres://chat:pw@db.example:6543/other",
        REDIS_URL="redis://cache.example:6380/2",
        ALLOWED_HOSTS="chat.example,www.chat.example",
        DEBUG="1",
        CHAT_MAX_MESSAGE_CHARS="100",
        CHAT_RATE_PER_SECOND="1.5",
        CHAT_RATE_BURST="3",
    )
    assert values == {
        "database": ["django.db.backends.postgresql", "chat", "db.example", 6543, "other"],
        "redis": "redis://cache.example:6380/2",
        "channel_layer_hosts": ["redis://cache.example:6380/2"],
        "allowed_hosts": ["chat.example", "www.chat.example"],
        "debug": True,
        "max_chars": 100,
        "rate": 1.5,
        "burst": 3,
        "site_url": "http://chat.example:8000",
    }


def test_site_url_leaves_out_the_default_port_of_the_site_scheme():
    assert settings_with(ALLOWED_HOSTS=".chat.example", SITE_SCHEME="https", SITE_PORT="443")["site_url"] == (
        "https://chat.example"
    )
    assert settings_with(SITE_URL="https://chat.example/")["site_url"] == "https://chat.example"


@pytest.mark.parametrize(
    "command",
    [
        ["manage.py", "check"],
        ["-m", "chatproject.serve", "-p", "0", "chatproject.asgi:application"],
        ["-m", "celery", "-A", "chatproject", "worker", "--pool", "solo"],
    ],
    ids=["manage.py", "web", "celery"],
)
def test_without_a_secret_key_each_process_exits_with_one_sentence_saying_how_to_set_one(command):
    # Empty rather than unset: a checkout's .env (read only for unset variables) cannot fill it in.
    env = {k: v for k, v in os.environ.items() if k != "DEBUG"}
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "chatproject.settings", "SECRET_KEY": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "SECRET_KEY is not set: set it in the environment (or in .env) to a long random value, e.g. the "
        "output of `python3 -c 'import secrets; print(secrets.token_urlsafe(50))'`."
    ]


@pytest.mark.parametrize("variable", ["WEB_HTTP_THREADS", "DB_CONN_IDLE_SECONDS"])
def test_a_web_thread_setting_of_zero_is_refused_with_its_name(variable):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatproject.settings", variable: "0"}
    result = subprocess.run(
        [sys.executable, "-c", READ_SETTINGS], cwd=ROOT, env=env, capture_output=True, text=True
    )

    assert result.returncode != 0
    assert f"{variable} must be" in result.stderr
