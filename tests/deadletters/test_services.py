"""Archive, failure join and replay message building, on the real database (no broker needed)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chatproject.deadletters import services
from chatproject.deadletters.models import DeadLetter, DeadLetterAction, TaskFailure
from chatproject.deadletters.retrying import DeadLetteringTask
from tests.deadletters.conftest import analytics_task_message, archive_letter, chat_event, x_death

pytestmark = pytest.mark.django_db


def _delivery() -> dict:
    message = analytics_task_message([chat_event(room_id=1, author_id=1)])
    headers = {**message.properties["application_headers"], "x-death": x_death()}
    properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
    return {"body": message.body, "headers": headers, "properties": properties}


def _record_failure(task_id: str) -> None:
    services.task_failure_record(
        task_id=task_id,
        task_name="analytics.record_chat_events",
        error_class="analytics.services.InvalidEvent",
        error_message="bad event",
        traceback="Traceback ...",
        attempts=3,
    )


def test_archiving_the_same_delivery_twice_keeps_one_row():
    delivery = _delivery()
    first = services.dead_letter_archive(**delivery)
    second = services.dead_letter_archive(**delivery)
    assert first.created and not second.created
    assert second.dead_letter.pk == first.dead_letter.pk
    assert DeadLetter.objects.count() == 1


def test_archive_reads_origin_reason_and_task_from_the_message():
    delivery = _delivery()
    letter = services.dead_letter_archive(**delivery).dead_letter
    assert (letter.origin_queue, letter.origin_exchange, letter.routing_key) == (
        "analytics",
        "chat_events",
        "chat.message.created",
    )
    assert letter.reason == "rejected"
    assert letter.task_name == "analytics.record_chat_events"
    assert letter.task_id == delivery["headers"]["id"]
    assert letter.first_death_at == letter.last_death_at is not None
    assert letter.status == DeadLetter.Status.NEW


def test_failure_recorded_before_the_dead_letter_is_joined_to_it():
    delivery = _delivery()
    _record_failure(delivery["headers"]["id"])
    letter = services.dead_letter_archive(**delivery).dead_letter
    assert (letter.error_class, letter.error_message, letter.attempts) == (
        "analytics.services.InvalidEvent",
        "bad event",
        3,
    )
    assert not TaskFailure.objects.exists()


def test_failure_recorded_after_the_dead_letter_completes_it():
    delivery = _delivery()
    letter = services.dead_letter_archive(**delivery).dead_letter
    _record_failure(delivery["headers"]["id"])
    letter.refresh_from_db()
    assert letter.error_class == "analytics.services.InvalidEvent"
    assert letter.traceback == "Traceback ..."
    assert not TaskFailure.objects.exists()


def test_body_and_headers_with_nul_are_archived_not_refused_by_postgresql():
    body = b'{"valid": "utf-8 but with a NUL \x00 inside"}'
    letter = services.dead_letter_archive(
        body=body,
        headers={"x-death": x_death(), "note": b"nul\x00byte", "text": "nul\x00char"},
        properties={"content_type": "application/json"},
    ).dead_letter
    letter.refresh_from_db()
    assert letter.body_encoding == DeadLetter.BodyEncoding.BASE64
    assert services.replay_message(letter)[0] == body
    assert "\x00" not in str(letter.headers)


def test_undecodable_body_is_kept_as_base64_and_replayed_byte_for_byte():
    body = b"\xff\xfe not utf-8"
    letter = services.dead_letter_archive(
        body=body, headers={"x-death": x_death()}, properties={"content_type": "application/octet-stream"}
    ).dead_letter
    assert letter.body_encoding == DeadLetter.BodyEncoding.BASE64
    replayed_body, _ = services.replay_message(letter)
    assert replayed_body == body


def test_replay_message_drops_the_death_history_and_starts_retries_afresh():
    delivery = _delivery()
    delivery["headers"].update(
        {"retries": 7, "x-first-death-queue": "analytics", "x-first-death-reason": "rejected"}
    )
    delivery["properties"].update({"expiration": "50", "user_id": "guest"})
    letter = services.dead_letter_archive(**delivery).dead_letter
    body, properties = services.replay_message(letter)
    headers = properties["application_headers"]
    assert body == delivery["body"].encode()
    assert not {"x-death", "x-first-death-queue", "x-first-death-reason"} & set(headers)
    assert headers["retries"] == 0
    assert headers[services.REPLAY_HEADER] == letter.pk
    assert headers["id"] == delivery["headers"]["id"]
    assert "expiration" not in properties and "user_id" not in properties
    assert properties["correlation_id"] == delivery["properties"]["correlation_id"]


def test_discard_marks_letters_and_records_who():
    letter = services.dead_letter_archive(**_delivery()).dead_letter
    result = services.dead_letter_discard(dead_letters=[letter], actor_label="cli:ops")
    letter.refresh_from_db()
    assert result.done == [letter.pk]
    assert letter.status == DeadLetter.Status.DISCARDED
    assert list(letter.actions.values_list("kind", "actor_label")) == [("discarded", "cli:ops")]


def test_orphan_task_failures_are_pruned_after_the_retention():
    from datetime import timedelta

    from django.utils import timezone

    TaskFailure.objects.create(task_id=str(uuid.uuid4()), failed_at=timezone.now() - timedelta(days=30))
    TaskFailure.objects.create(task_id=str(uuid.uuid4()))
    assert services.task_failures_prune(older_than=timedelta(days=7)) == 1
    assert TaskFailure.objects.count() == 1


def _letter(*, status: str, resolved_days_ago: float) -> DeadLetter:
    """An archived letter, replayed or discarded (or left new) that many days ago."""
    letter = archive_letter()
    if status == DeadLetter.Status.REPLAYED:
        # The audit row a replay leaves (replaying needs the broker; test_replay.py does that).
        DeadLetterAction.objects.create(dead_letter=letter, kind="replayed", actor_label="cli:ops")
    elif status == DeadLetter.Status.DISCARDED:
        services.dead_letter_discard(dead_letters=[letter], actor_label="cli:ops")
    when = timezone.now() - timedelta(days=resolved_days_ago)
    DeadLetter.objects.filter(pk=letter.pk).update(status=status, updated_at=when, archived_at=when)
    return letter


def test_resolved_dead_letters_past_the_retention_are_pruned_with_their_audit_rows(settings):
    settings.DLQ_RESOLVED_RETENTION_DAYS = 30
    old_replayed = _letter(status=DeadLetter.Status.REPLAYED, resolved_days_ago=31)
    old_discarded = _letter(status=DeadLetter.Status.DISCARDED, resolved_days_ago=31)
    recent_replayed = _letter(status=DeadLetter.Status.REPLAYED, resolved_days_ago=29)
    recent_discarded = _letter(status=DeadLetter.Status.DISCARDED, resolved_days_ago=1)

    assert services.dead_letters_prune() == 2

    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {recent_replayed.pk, recent_discarded.pk}
    assert not DeadLetterAction.objects.filter(
        dead_letter_id__in=[old_replayed.pk, old_discarded.pk]
    ).exists()


def test_unresolved_dead_letters_are_never_pruned_however_old():
    ancient = _letter(status=DeadLetter.Status.NEW, resolved_days_ago=3650)

    assert services.dead_letters_prune() == 0

    assert DeadLetter.objects.filter(pk=ancient.pk).exists()


def test_dead_letter_prune_deletes_in_chunks_loading_only_primary_keys(monkeypatch):
    monkeypatch.setattr("chatproject.database.DELETE_CHUNK", 2)
    for _ in range(5):
        _letter(status=DeadLetter.Status.DISCARDED, resolved_days_ago=365)
    keep = _letter(status=DeadLetter.Status.NEW, resolved_days_ago=365)

    with CaptureQueriesContext(connection) as queries:
        assert services.dead_letters_prune() == 5

    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [keep.pk]
    assert not DeadLetterAction.objects.exists()
    # A letter's body can be a 200-event batch: a chunk must not load thousands of them.
    loaded = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert loaded and not any('"body"' in sql for sql in loaded)


def test_dead_lettering_task_retries_transient_errors_with_jittered_backoff():
    from chatproject.celery import app

    attempts = []

    @app.task(
        base=DeadLetteringTask, name="tests.deadletters.flaky", retry_for=(ConnectionError,), max_retries=4
    )
    def flaky() -> None:
        attempts.append(1)
        raise ConnectionError("db down")

    # Eager apply runs the retries inline (no countdown wait); the last error then propagates.
    result = flaky.apply()
    assert result.state == "FAILURE"
    assert isinstance(result.result, ConnectionError)
    assert len(attempts) == 5
    assert (flaky.retry_backoff, flaky.retry_backoff_max, flaky.retry_jitter) == (1, 60, True)


def test_dead_lettering_task_rejects_never_succeeding_errors_without_requeue():
    from celery.exceptions import Reject

    from chatproject.celery import app

    @app.task(base=DeadLetteringTask, name="tests.deadletters.invalid", reject_for=(ValueError,))
    def invalid() -> None:
        raise ValueError("bad payload")

    with pytest.raises(Reject) as raised:
        invalid()
    assert raised.value.requeue is False
    assert isinstance(raised.value.__cause__, ValueError)


def test_archiving_a_batch_stores_each_letter_once_even_when_delivered_again():
    deliveries = [_delivery() for _ in range(3)]
    first = services.dead_letters_archive(deliveries=deliveries)
    again = services.dead_letters_archive(deliveries=[deliveries[1], _delivery()])
    assert [r.created for r in first] == [True, True, True]
    assert [r.created for r in again] == [False, True]
    assert DeadLetter.objects.count() == 4


def test_failure_note_in_the_same_batch_is_joined_to_its_letter_and_not_archived():
    import json

    delivery = _delivery()
    note = {
        "body": json.dumps(
            {
                "task_id": delivery["headers"]["id"],
                "task_name": "analytics.record_chat_events",
                "error_class": "django.db.utils.OperationalError",
                "error_message": "connection refused",
                "traceback": "Traceback ...",
                "attempts": 13,
            }
        ),
        "headers": {services.FAILURE_NOTE_HEADER: 1},
        "properties": {"content_type": "application/json"},
    }
    results = services.dead_letters_archive(deliveries=[note, delivery])
    assert len(results) == 1
    letter = results[0].dead_letter
    assert (letter.error_class, letter.attempts) == ("django.db.utils.OperationalError", 13)
    assert DeadLetter.objects.count() == 1
    assert not TaskFailure.objects.exists()
