"""`manage.py dlq` and `manage.py queues`: tables for people, JSON for scripts."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from bench.procfile import ROOT, child_process_env
from deadletters.models import DeadLetter, DeadLetterAction
from tests.deadletters.conftest import archive_letter
from tests.harness import wait_until


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def letters(db) -> dict[str, DeadLetter]:
    return {
        "rejected": archive_letter(task_id="task-rejected"),
        "expired": archive_letter(reason="expired", queue="notifications"),
    }


def test_dlq_list_prints_a_table(letters):
    output = run("dlq", "list")
    assert "Dead letters (2 shown)" in output
    assert "notifications" in output and "expired" in output
    assert "analytics.record_chat_events" in output


def test_dlq_list_json_filters_by_reason(letters):
    rows = json.loads(run("dlq", "list", "--json", "--reason", "expired"))
    assert [(row["id"], row["origin_queue"], row["reason"]) for row in rows] == [
        (letters["expired"].pk, "notifications", "expired")
    ]


def test_dlq_show_json_has_payload_headers_and_x_death(letters):
    detail = json.loads(run("dlq", "show", str(letters["rejected"].pk), "--json"))
    assert detail["task_id"] == "task-rejected"
    assert detail["payload"][0][0][0]["type"] == "chat.message.created"  # Celery's [args, kwargs, embed]
    assert detail["headers"]["task"] == "analytics.record_chat_events"
    assert detail["x_death"][0]["reason"] == "rejected"


def test_dlq_show_of_a_missing_id_fails_with_one_line(db):
    with pytest.raises(CommandError, match="no dead letter with id 999"):
        run("dlq", "show", "999")


def test_dlq_discard_dry_run_changes_nothing(letters):
    output = run("dlq", "discard", "--all", "--queue", "analytics", "--dry-run")
    assert output.strip() == f"would discard 1 dead letters: {letters['rejected'].pk}"
    assert not DeadLetter.objects.exclude(status="new").exists()


def test_dlq_discard_all_with_a_filter_discards_only_matches_and_audits(letters):
    output = run("dlq", "discard", "--all", "--reason", "expired")
    assert "discarded 1 dead letters" in output
    statuses = dict(DeadLetter.objects.values_list("pk", "status"))
    assert statuses == {letters["expired"].pk: "discarded", letters["rejected"].pk: "new"}
    assert DeadLetterAction.objects.get().actor_label.startswith("cli:")


def test_dlq_replay_needs_ids_or_all(db):
    with pytest.raises(CommandError, match="give dead letter ids or --all"):
        run("dlq", "replay")


@pytest.mark.broker
def test_dlq_replay_by_id_republishes_and_marks_it(letters, broker_url):
    output = run("dlq", "replay", str(letters["rejected"].pk))
    assert "replayed 1 dead letters" in output
    letters["rejected"].refresh_from_db()
    assert (letters["rejected"].status, letters["rejected"].replay_count) == ("replayed", 1)


@pytest.mark.broker
def test_queues_json_lists_every_topology_queue_with_its_dead_letter_settings(broker_url):
    from messaging.topology import declared_queues

    def rows_from_the_api() -> dict | None:
        rows = {row["name"]: row for row in json.loads(run("queues", "--json"))}
        # The management API has counts for a queue once its stats collector sampled it, and
        # samples every few seconds: a consumer an earlier test killed can still show unacked.
        sampled = rows["analytics"]["source"] == "management API"
        return rows if sampled and rows["analytics"].get("messages_unacked") == 0 else None

    rows = wait_until(rows_from_the_api, timeout=30, message="the management API never described the queues")
    assert set(rows) == {queue.name for queue in declared_queues()}
    analytics = rows["analytics"]
    assert analytics["dead_letter_exchange"] == "dead_letter"
    assert {"messages_ready", "messages_unacked", "consumers"} <= set(analytics)
    assert analytics["messages_unacked"] == 0
    assert rows["dead_letters"]["dead_letter_exchange"] is None


@pytest.mark.broker
def test_queues_table_names_each_queue(broker_url):
    output = run("queues")
    assert "RabbitMQ queues" in output
    assert "analytics" in output and "dead_letters" in output and "dead_letter" in output


@pytest.mark.broker
def test_queues_falls_back_to_passive_declares_without_the_management_api(broker_url):
    with override_settings(RABBITMQ_MANAGEMENT_URL="http://127.0.0.1:1"):
        rows = {row["name"]: row for row in json.loads(run("queues", "--json"))}
    assert rows["analytics"]["source"] == "passive declare"
    assert rows["analytics"]["messages_ready"] == 0
    assert rows["analytics"]["messages_unacked"] is None
    assert rows["analytics"]["dead_letter_exchange"] == "dead_letter"


@pytest.mark.broker
def test_queues_reports_the_ready_count_of_a_queue(broker_url):
    from tests.deadletters.conftest import analytics_task_message, publish, queue_depth

    publish(broker_url, analytics_task_message([]))
    assert queue_depth(broker_url, "analytics") == 1

    def analytics_ready() -> object:
        rows = {row["name"]: row for row in json.loads(run("queues", "--json"))}
        # The management API refreshes its counts every few seconds.
        return rows["analytics"]["messages_ready"] == 1

    wait_until(analytics_ready, timeout=30, message="queues never showed the ready message")


@pytest.mark.broker
def test_queues_uses_credentials_given_in_the_management_url(broker_url):
    def analytics_source() -> object:
        with override_settings(RABBITMQ_MANAGEMENT_URL="http://guest:guest@localhost:15672/"):
            rows = {row["name"]: row for row in json.loads(run("queues", "--json"))}
        return rows["analytics"]["source"] == "management API"

    wait_until(analytics_source, timeout=30, message="the management API was not used")


def test_queues_fails_with_one_line_when_rabbitmq_is_unreachable():
    with (
        override_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//", RABBITMQ_MANAGEMENT_URL=""),
        pytest.raises(CommandError, match="RabbitMQ is unreachable"),
    ):
        run("queues")


def test_one_management_url_per_broker_node_is_required_when_several_are_listed():
    env = {
        **child_process_env(),
        "CELERY_BROKER_URL": "amqp://a//;amqp://b//;amqp://c//",
        "RABBITMQ_MANAGEMENT_URL": "http://a:15672;http://b:15672",
    }
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "RABBITMQ_MANAGEMENT_URL lists 2 URLs and CELERY_BROKER_URL 3 nodes" in done.stderr
