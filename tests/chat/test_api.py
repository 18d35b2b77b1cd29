"""History API and health check over HTTP, against the real database and Redis."""

import json
import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import pytest
from django.test import Client, override_settings

from bench.procfile import free_port
from chat import services
from infrastructure.postgres import database_connect_autocommit
from monitoring.views import LOAD_BALANCER_CHECK_URI
from tests.conftest import ROOT


@pytest.fixture
def history(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    messages = [
        services.message_create(room=room, author=alice, text=f"m{i}", client_id=uuid.uuid4()).message
        for i in range(1, 8)
    ]
    client = Client()
    client.force_login(alice)
    return client, messages


def get_page(client, **params):
    response = client.get("/api/rooms/general/messages", params)
    assert response.status_code == 200
    body = response.json()
    return [m["text"] for m in body["messages"]], body["has_more"]


@pytest.mark.django_db
def test_history_latest_page_is_oldest_first(history):
    client, _ = history
    assert get_page(client, limit=3) == (["m5", "m6", "m7"], True)


@pytest.mark.django_db
def test_history_before_pages_backwards(history):
    client, messages = history
    assert get_page(client, before=messages[4].id, limit=3) == (["m2", "m3", "m4"], True)
    assert get_page(client, before=messages[1].id, limit=3) == (["m1"], False)


@pytest.mark.django_db
def test_history_after_pages_forwards(history):
    client, messages = history
    assert get_page(client, after=messages[2].id, limit=3) == (["m4", "m5", "m6"], True)
    assert get_page(client, after=messages[5].id, limit=3) == (["m7"], False)


@pytest.mark.django_db
def test_history_message_has_the_socket_frame_shape(history):
    client, messages = history
    frame = client.get("/api/rooms/general/messages", {"limit": 1}).json()["messages"][0]
    assert set(frame) == {"type", "id", "seq", "room", "user", "text", "created_at", "client_id", "vip"}
    assert frame["id"] == messages[-1].id and frame["seq"] == 7


@pytest.mark.django_db
def test_history_limit_is_capped_at_100(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    for _ in range(105):
        services.message_create(room=room, author=alice, text="x", client_id=uuid.uuid4())
    client = Client()
    client.force_login(alice)
    assert len(client.get("/api/rooms/general/messages", {"limit": 500}).json()["messages"]) == 100


@pytest.mark.django_db
@pytest.mark.parametrize("params", [{"limit": "ten"}, {"before": "-1"}, {"before": 3, "after": 1}])
def test_history_rejects_bad_parameters(history, params):
    client, _ = history
    response = client.get("/api/rooms/general/messages", params)
    assert response.status_code == 400 and response.json()["error"]


@pytest.mark.django_db
def test_history_refuses_anonymous_and_non_members(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_room("leads", is_private=True, members=(alice,))
    assert Client().get("/api/rooms/leads/messages").status_code == 401
    outsider = Client()
    outsider.force_login(bob)
    assert outsider.get("/api/rooms/leads/messages").status_code == 404


@pytest.mark.django_db
def test_healthz_reports_every_service_up():
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "web": "ok",
        "database": "ok",
        "channel_layer": "ok",
        "broker": "ok",
        "status": "ok",
    }


@pytest.mark.django_db
@override_settings(
    REDIS_URL="redis://127.0.0.1:1/0",
    CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//",
)
def test_load_balancer_check_asks_only_whether_this_process_serves():
    # A service every web process shares being down must not take them all out of rotation.
    response = Client().get(LOAD_BALANCER_CHECK_URI)

    assert response.status_code == 200
    assert response.json() == {"web": "ok", "status": "ok"}


@pytest.mark.django_db
def test_healthz_with_a_minority_of_the_broker_nodes_answering_says_the_broker_is_down(broker_url, settings):
    # A cluster of three (tests/cluster/ has a real one): only the first node answers.
    live_port = f":{urlsplit(broker_url).port}/"
    dead = [broker_url.replace(live_port, f":{free_port()}/") for _ in range(2)]
    settings.CELERY_BROKER_URL = ";".join([broker_url, *dead])

    response = Client().get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down: broker"
    assert body["broker"].startswith("down: RabbitMQ is not reachable")
    assert body["broker_nodes"] == [
        {"node": 1, "state": "ok", "in_use": True},
        {"node": 2, "state": "down", "in_use": False},
        {"node": 3, "state": "down", "in_use": False},
    ]


@pytest.mark.django_db
@override_settings(REDIS_URL="redis://127.0.0.1:1/0")
def test_healthz_names_the_service_that_is_down():
    response = Client().get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["channel_layer"].startswith("down") and body["database"] == "ok"
    assert body["status"] == "down: channel_layer"


@pytest.mark.django_db
@override_settings(REDIS_URL="redis://127.0.0.1:1/0")
def test_healthz_tells_anyone_what_is_down_without_its_address():
    body = Client().get("/healthz").json()

    assert body["channel_layer"] == (
        "down: Redis is not reachable: sockets cannot connect and stored messages reach no one live"
    )
    assert "127.0.0.1" not in json.dumps(body)


@pytest.mark.django_db
@override_settings(REDIS_URL="redis://127.0.0.1:1/0", METRICS_BEARER_TOKEN="scrape-token")
def test_healthz_tells_staff_and_the_monitoring_token_where_the_service_was_looked_for(make_user):
    staff = Client()
    staff.force_login(make_user("root", is_staff=True))
    member = Client()
    member.force_login(make_user("alice"))

    for_staff = staff.get("/healthz").json()["channel_layer"]
    for_monitoring = Client(headers={"Authorization": "Bearer scrape-token"}).get("/healthz").json()
    for_member = member.get("/healthz").json()["channel_layer"]

    assert for_staff.startswith("down: Redis is not reachable: ") and "at redis://127.0.0.1:1/0)" in for_staff
    assert for_monitoring["channel_layer"] == for_staff
    assert "127.0.0.1" not in for_member


def run_preflight(**env):
    return subprocess.run(
        [sys.executable, "manage.py", "preflight"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {"DATABASE_URL": "postgres://postgres@127.0.0.1:1/chat"},
            ["PostgreSQL", "127.0.0.1:1", "pg_ctlcluster"],
        ),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, ["Redis", "127.0.0.1:1", "redis-server"]),
        (
            {"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"},
            ["RabbitMQ", "127.0.0.1:1", "rabbitmq-server"],
        ),
    ],
)
def test_preflight_names_the_missing_service_without_traceback(env, names):
    result = run_preflight(**env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for name in names:
        assert name in result.stderr


def database_exists(name: str) -> bool:
    conn = database_connect_autocommit(dbname="postgres")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            return cursor.fetchone() is not None
    finally:
        conn.close()


def test_preflight_creates_a_missing_database():
    name = f"preflight_{uuid.uuid4().hex[:12]}"
    url = f"postgres://postgres@127.0.0.1:5432/{name}"
    try:
        first = run_preflight(DATABASE_URL=url)
        created = database_exists(name)
        again = run_preflight(DATABASE_URL=url)
    finally:
        conn = database_connect_autocommit(dbname="postgres")
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()
    assert first.returncode == 0 and "Created the PostgreSQL database." in first.stdout
    assert created
    assert again.returncode == 0 and "Created" not in again.stdout
