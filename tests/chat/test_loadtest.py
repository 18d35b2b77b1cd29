"""`manage.py loadtest` and bench.loadtest against a live daphne (tiny loads; no timing assertions)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core.management import CommandError, call_command

from bench import loadtest
from bench.procfile import free_port
from chat.models import Message, Room
from chat.services import message_create


def _clients(*, rooms: int, per_room: int) -> tuple[list[loadtest.LoadClient], list[str]]:
    users = loadtest.loadtest_users_ensure(count=rooms * per_room)
    slugs = [room.slug for room in loadtest.loadtest_rooms_ensure(count=rooms)]
    keys = loadtest.loadtest_sessions_create(users=users)
    clients = [loadtest.LoadClient(room=slugs[i // per_room], session_key=key) for i, key in enumerate(keys)]
    return clients, keys


def test_small_load_is_fully_delivered_acknowledged_and_persisted(live_daphne):
    clients, _ = _clients(rooms=2, per_room=3)
    progress_calls: list[tuple[int, int]] = []

    report, client_ids = asyncio.run(
        loadtest.load_run(
            target=loadtest.Target(live_daphne.http_url),
            clients=clients,
            messages=3,
            rate=4.0,
            progress=lambda done, total: progress_calls.append((done, total)),
        )
    )
    report.persisted = loadtest.loadtest_persisted_count(client_ids=client_ids)
    summary = report.summary()

    assert summary["connected"] == 6
    assert summary["sent"] == 18
    assert summary["acked"] == 18
    assert summary["expected_deliveries"] == 18 * 2  # each message reaches the 2 other clients
    assert progress_calls and progress_calls[-1] == (18 * 2, 18 * 2)  # the bar ends full
    assert summary["delivered_pct"] == 100.0
    assert summary["persisted_pct"] == 100.0
    assert summary["duplicates"] == 0
    assert summary["errors"] == {}
    for key in ("deliveries_per_second", "latency_p50_ms", "latency_p99_ms", "ack_p99_ms", "seconds"):
        assert summary[key] is not None


def test_connections_only_counts_sockets_that_receive_one_broadcast(live_daphne):
    clients, _ = _clients(rooms=1, per_room=20)

    report = asyncio.run(
        loadtest.connections_run(
            target=loadtest.Target(live_daphne.http_url),
            clients=clients,
            hold_seconds=0.5,
            rss=lambda: loadtest.process_rss_bytes(live_daphne.pid),
        )
    )
    summary = report.summary()

    assert summary["connected"] == 20
    assert summary["open_after_hold"] == 20
    assert summary["received_broadcast"] == 20
    assert summary["rss_after_bytes"] > 0
    assert summary["errors"] == {}


def test_command_reports_json_and_deletes_its_sessions(live_daphne):
    sessions_before = Session.objects.count()
    out = io.StringIO()

    call_command(
        "loadtest",
        "--url",
        live_daphne.http_url,
        "--rooms=1",
        "--clients=2",
        "--messages=2",
        "--rate=4",
        "--json",
        stdout=out,
        stderr=io.StringIO(),
    )

    summary = json.loads(out.getvalue())
    assert summary["delivered_pct"] == 100.0
    assert summary["persisted_pct"] == 100.0
    assert Session.objects.count() == sessions_before


def test_command_prints_a_summary_table_of_the_run(live_daphne, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width when stdout is not a terminal

    call_command(
        "loadtest", "--url", live_daphne.http_url, "--rooms=1", "--clients=2", "--messages=2", "--rate=4"
    )

    table = capsys.readouterr().out
    for row in (
        "delivered (to the other clients)",
        "persisted in PostgreSQL",
        "deliveries/s",
        "send-to-receive p50",
        "send-to-receive p99",
    ):
        assert row in table
    # 4 messages, each delivered to the one other client and each persisted.
    assert table.count("100.00% (4 of 4)") == 2


def test_a_rooms_and_clients_sweep_prints_one_line_per_load_and_a_json_list(live_daphne, capsys):
    sweep = ("--rooms=1,2", "--clients=2,3", "--messages=1", "--rate=4")

    call_command("loadtest", "--url", live_daphne.http_url, *sweep)
    lines = [line for line in capsys.readouterr().out.splitlines() if " x 4/s: " in line]
    out = io.StringIO()
    call_command("loadtest", "--url", live_daphne.http_url, *sweep, "--json", stdout=out)

    assert [line.split(":")[0] for line in lines] == [
        "1 x 2 x 4/s",
        "1 x 3 x 4/s",
        "2 x 2 x 4/s",
        "2 x 3 x 4/s",
    ]
    assert all("delivered 100.00%, stored 100.00%" in line for line in lines), lines
    summaries = json.loads(out.getvalue())
    assert [(load["rooms"], load["clients_per_room"], load["sent"]) for load in summaries] == [
        (1, 2, 2),
        (1, 3, 3),
        (2, 2, 4),
        (2, 3, 6),
    ]


def test_command_refuses_a_sweep_of_held_sockets(db):
    with pytest.raises(CommandError, match="no --rooms/--clients sweep"):
        call_command("loadtest", "--url", "http://127.0.0.1:1", "--connections-only=5", "--rooms=1,2")


def test_command_fails_with_one_sentence_when_the_server_is_unreachable(db):
    url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(CommandError, match=rf"^The chat server at {url} cannot be reached \(.+\)\.$"):
        call_command("loadtest", "--url", url, "--rooms=1", "--clients=2", "--messages=1")


def test_command_refuses_a_rate_over_the_per_user_limit(db):
    with pytest.raises(CommandError, match="per-user limit"):
        call_command("loadtest", "--url", "http://127.0.0.1:1", "--rate=50")


def test_delete_data_removes_load_test_users_rooms_and_messages(db, make_user):
    (user,) = loadtest.loadtest_users_ensure(count=1)
    (room,) = loadtest.loadtest_rooms_ensure(count=1)
    message_create(room=room, author=user, text="load", client_id=uuid.uuid4(), broadcast=False)
    bystander = make_user("not-a-load-test-user")

    call_command("loadtest", "--delete-data", stdout=io.StringIO())

    assert not Room.objects.filter(slug__startswith="loadtest-").exists()
    assert not get_user_model().objects.filter(username__startswith="loadtest-").exists()
    assert not Message.objects.filter(room_id=room.pk).exists()
    assert get_user_model().objects.filter(pk=bystander.pk).exists()


def _loadtest_json(*args: str) -> dict:
    out = io.StringIO()
    call_command(
        "loadtest",
        *args,
        "--rooms=1",
        "--clients=2",
        "--messages=2",
        "--rate=4",
        "--json",
        stdout=out,
        stderr=io.StringIO(),
    )
    return json.loads(out.getvalue())


def test_command_through_the_load_balancer_reports_each_serving_process_cpu(web_tier):
    summary = _loadtest_json("--url", web_tier.http_url)

    assert summary["delivered_pct"] == 100.0
    pids = {process["name"]: process["pid"] for process in summary["process_cpu"]}
    assert pids == {
        "lb": web_tier.balancer.child.pid,
        "web1": web_tier.servers[0].pid,
        "web2": web_tier.servers[1].pid,
    }
    assert all(process["cpu_seconds"] >= 0 for process in summary["process_cpu"])


@pytest.mark.django_db(transaction=True)
def test_command_starts_web_processes_behind_a_load_balancer_and_goes_through_it():
    summary = _loadtest_json("--web-processes=2")

    assert summary["delivered_pct"] == 100.0 and summary["persisted_pct"] == 100.0
    assert [process["name"] for process in summary["process_cpu"]] == ["lb", "web1", "web2"]
