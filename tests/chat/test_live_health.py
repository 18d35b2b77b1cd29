"""`/healthz` served by a real daphne whose database or broker is unreachable."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from django.db import connection

from bench.procfile import DaphneServer, free_port
from infrastructure.postgres import database_url


def get_health(server: DaphneServer) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{server.http_url}/healthz", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def server_with_env(transactional_db):
    servers: list[DaphneServer] = []

    def start(**env: str) -> DaphneServer:
        server = DaphneServer(port=free_port(), extra_env=env)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def test_healthz_answers_503_naming_the_database_when_postgresql_is_unreachable(server_with_env):
    port = free_port()
    closed = database_url({**connection.settings_dict, "HOST": "127.0.0.1", "PORT": port})
    server = server_with_env(DATABASE_URL=closed)

    status, body = get_health(server)

    assert status == 503
    assert body["status"] == "down: database"
    assert body["database"].startswith("down: PostgreSQL is not reachable: ")
    # Anyone may ask: no host, port or database name.
    assert "127.0.0.1" not in body["database"] and str(port) not in body["database"]
    assert connection.settings_dict["NAME"] not in body["database"]
    assert body["channel_layer"] == "ok" and body["broker"] == "ok"


def test_healthz_answers_503_naming_the_broker_when_rabbitmq_is_unreachable(server_with_env):
    server = server_with_env(CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//")

    status, body = get_health(server)

    assert status == 503
    assert body["status"] == "down: broker"
    assert body["broker"].startswith("down: ")
    assert body["database"] == "ok" and body["channel_layer"] == "ok"
