"""Archive, failure join and replay message building, on the real database (no broker needed)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from deadletters.models import DeadLetter, DeadLetterAction, TaskFailure
from deadletters.services.archive import (
    ArchiveOutcome,
    dead_letter_archive,
    dead_letters_archive,
    dead_letters_mark_acked,
)
from deadletters.services.delivery_rows import body_bytes
from deadletters.services.resolution import REPLAY_HEADER, dead_letter_discard, replay_message
from deadletters.services.retention import dead_letters_prune, task_failures_prune
from deadletters.services.task_failures import FAILURE_NOTE_HEADER, task_failure_record
from messaging.retrying import DeadLetteringTask
from tests.deadletters.conftest import (
    REFUSED_HEADER,
    analytics_task_message,
    archive_letter,
    chat_event,
    x_death,
)

pytestmark = pytest.mark.django_db


def _delivery() -> dict:
    message = analytics_task_message([chat_event(room_id=1, author_id=1)])
    headers = {**message.properties["application_headers"], "x-death": x_death()}
    properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
    return {"body": message.body, "headers": headers, "properties": properties}


def _record_failure(task_id: str) -> None:
    task_failure_record(
        task_id=task_id,
        task_name="analytics.record_chat_events",
        error_class="analytics.services.InvalidEvent",
        error_message="bad event",
        traceback="Traceback ...",
        attempts=3,
    )


def test_a_redelivery_takes_over_the_row_its_unacked_first_delivery_left():
    delivery = _delivery()
    first = dead_letter_archive(**delivery)
    second = dead_letter_archive(**delivery, redelivered=True)
    assert first.created and not second.created
    assert second.outcome is ArchiveOutcome.ALREADY_ARCHIVED
    assert second.dead_letter.pk == first.dead_letter.pk
    assert DeadLetter.objects.count() == 1


def test_identical_first_deliveries_are_two_dead_letters():
    # RabbitMQ never flags a first delivery as redelivered: it cannot have been archived before.
    delivery = _delivery()
    first = dead_letter_archive(**delivery)
    second = dead_letter_archive(**delivery)
    assert first.created and second.created
    assert first.dead_letter.fingerprint == second.dead_letter.fingerprint
    assert DeadLetter.objects.count() == 2


def test_a_redelivered_twin_of_an_acked_letter_is_a_new_dead_letter():
    delivery = _delivery()
    first = dead_letter_archive(**delivery)
    dead_letters_mark_acked(dead_letters=[first.dead_letter])
    twin = dead_letter_archive(**delivery, redelivered=True)
    assert twin.created
    assert twin.dead_letter.pk != first.dead_letter.pk
    assert DeadLetter.objects.count() == 2


def test_each_redelivery_takes_over_one_row_and_those_beyond_get_rows_of_their_own():
    delivery = _delivery()
    dead_letters_archive(deliveries=[delivery, delivery])
    results = dead_letters_archive(deliveries=[{**delivery, "redelivered": True}] * 3)
    assert [r.outcome for r in results] == [
        ArchiveOutcome.ALREADY_ARCHIVED,
        ArchiveOutcome.ALREADY_ARCHIVED,
        ArchiveOutcome.ARCHIVED,
    ]
    assert len({r.dead_letter.pk for r in results}) == 3
    assert DeadLetter.objects.count() == 3


def test_archive_reads_origin_reason_and_task_from_the_message():
    delivery = _delivery()
    letter = dead_letter_archive(**delivery).dead_letter
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
    letter = dead_letter_archive(**delivery).dead_letter
    assert (letter.error_class, letter.error_message, letter.attempts) == (
        "analytics.services.InvalidEvent",
        "bad event",
        3,
    )
    assert not TaskFailure.objects.exists()


def test_failure_recorded_after_the_dead_letter_completes_it():
    delivery = _delivery()
    letter = dead_letter_archive(**delivery).dead_letter
    _record_failure(delivery["headers"]["id"])
    letter.refresh_from_db()
    assert letter.error_class == "analytics.services.InvalidEvent"
    assert letter.traceback == "Traceback ..."
    assert not TaskFailure.objects.exists()


def test_body_and_headers_with_nul_are_archived_not_refused_by_postgresql():
    body = b'{"valid": "utf-8 but with a NUL \x00 inside"}'
    letter = dead_letter_archive(
        body=body,
        headers={"x-death": x_death(), "note": b"nul\x00byte", "text": "nul\x00char"},
        properties={"content_type": "application/json"},
    ).dead_letter
    letter.refresh_from_db()
    assert letter.body_encoding == DeadLetter.BodyEncoding.BASE64
    assert replay_message(letter)[0] == body
    assert "\x00" not in str(letter.headers)


def test_undecodable_body_is_kept_as_base64_and_replayed_byte_for_byte():
    body = b"\xff\xfe not utf-8"
    letter = dead_letter_archive(
        body=body, headers={"x-death": x_death()}, properties={"content_type": "application/octet-stream"}
    ).dead_letter
    assert letter.body_encoding == DeadLetter.BodyEncoding.BASE64
    replayed_body, _ = replay_message(letter)
    assert replayed_body == body


def test_replay_message_drops_the_death_history_and_starts_retries_afresh():
    delivery = _delivery()
    delivery["headers"].update(
        {"retries": 7, "x-first-death-queue": "analytics", "x-first-death-reason": "rejected"}
    )
    delivery["properties"].update({"expiration": "50", "user_id": "guest"})
    letter = dead_letter_archive(**delivery).dead_letter
    body, properties = replay_message(letter)
    headers = properties["application_headers"]
    assert body == delivery["body"].encode()
    assert not {"x-death", "x-first-death-queue", "x-first-death-reason"} & set(headers)
    assert headers["retries"] == 0
    assert headers[REPLAY_HEADER] == letter.pk
    assert headers["id"] == delivery["headers"]["id"]
    assert "expiration" not in properties and "user_id" not in properties
    assert properties["correlation_id"] == delivery["properties"]["correlation_id"]


def test_discard_marks_letters_and_records_who():
    letter = dead_letter_archive(**_delivery()).dead_letter
    result = dead_letter_discard(dead_letters=[letter], actor_label="cli:ops")
    letter.refresh_from_db()
    assert result.done == [letter.pk]
    assert letter.status == DeadLetter.Status.DISCARDED
    assert list(letter.actions.values_list("kind", "actor_label")) == [("discarded", "cli:ops")]


def test_orphan_task_failures_are_pruned_after_the_retention():
    from datetime import timedelta

    from django.utils import timezone

    TaskFailure.objects.create(task_id=str(uuid.uuid4()), failed_at=timezone.now() - timedelta(days=30))
    TaskFailure.objects.create(task_id=str(uuid.uuid4()))
    assert task_failures_prune(older_than=timedelta(days=7)) == 1
    assert TaskFailure.objects.count() == 1


def _letter(*, status: str, resolved_days_ago: float) -> DeadLetter:
    """An archived letter, replayed or discarded (or left new) that many days ago."""
    letter = archive_letter()
    if status == DeadLetter.Status.REPLAYED:
        # The audit row a replay leaves (replaying needs the broker; test_replay.py does that).
        DeadLetterAction.objects.create(dead_letter=letter, kind="replayed", actor_label="cli:ops")
    elif status == DeadLetter.Status.DISCARDED:
        dead_letter_discard(dead_letters=[letter], actor_label="cli:ops")
    when = timezone.now() - timedelta(days=resolved_days_ago)
    DeadLetter.objects.filter(pk=letter.pk).update(status=status, updated_at=when, archived_at=when)
    return letter


def test_resolved_dead_letters_past_the_retention_are_pruned_with_their_audit_rows(settings):
    settings.DLQ_RESOLVED_RETENTION_DAYS = 30
    old_replayed = _letter(status=DeadLetter.Status.REPLAYED, resolved_days_ago=31)
    old_discarded = _letter(status=DeadLetter.Status.DISCARDED, resolved_days_ago=31)
    recent_replayed = _letter(status=DeadLetter.Status.REPLAYED, resolved_days_ago=29)
    recent_discarded = _letter(status=DeadLetter.Status.DISCARDED, resolved_days_ago=1)

    assert dead_letters_prune() == 2

    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {recent_replayed.pk, recent_discarded.pk}
    assert not DeadLetterAction.objects.filter(
        dead_letter_id__in=[old_replayed.pk, old_discarded.pk]
    ).exists()


def test_unresolved_dead_letters_are_never_pruned_however_old():
    ancient = _letter(status=DeadLetter.Status.NEW, resolved_days_ago=3650)

    assert dead_letters_prune() == 0

    assert DeadLetter.objects.filter(pk=ancient.pk).exists()


def test_dead_letter_prune_deletes_in_chunks_loading_only_primary_keys(monkeypatch):
    monkeypatch.setattr("infrastructure.postgres.DELETE_CHUNK", 2)
    for _ in range(5):
        _letter(status=DeadLetter.Status.DISCARDED, resolved_days_ago=365)
    keep = _letter(status=DeadLetter.Status.NEW, resolved_days_ago=365)

    with CaptureQueriesContext(connection) as queries:
        assert dead_letters_prune() == 5

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
    first = dead_letters_archive(deliveries=deliveries)
    again = dead_letters_archive(deliveries=[{**deliveries[1], "redelivered": True}, _delivery()])
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
        "headers": {FAILURE_NOTE_HEADER: 1},
        "properties": {"content_type": "application/json"},
    }
    results = dead_letters_archive(deliveries=[note, delivery])
    assert [r.outcome for r in results] == [ArchiveOutcome.FAILURE_RECORDED, ArchiveOutcome.ARCHIVED]
    letter = results[1].dead_letter
    assert (letter.error_class, letter.attempts) == ("django.db.utils.OperationalError", 13)
    assert DeadLetter.objects.count() == 1
    assert not TaskFailure.objects.exists()


# --- letters the database refuses -----------------------------------------------------------


def _poisoned(how: str) -> dict:
    delivery = _delivery()
    headers = delivery["headers"]
    if how == "task name too long for its column":
        headers["task"] = "analytics." + "x" * 300
    elif how == "reason too long for its column":
        headers["x-death"][0]["reason"] = "r" * 40
    elif how == "negative retries break a check constraint":
        headers["retries"] = -5
    elif how == "NUL in the task id":
        headers["id"] = "task\x00id"
    elif how == "x-death count that is no number":
        headers["x-death"][0]["count"] = "many"
    elif how == "failure note that is no JSON":
        delivery["headers"] = {FAILURE_NOTE_HEADER: 1}
        delivery["body"] = b"{not json"
    return delivery


@pytest.mark.parametrize(
    "how",
    [
        "task name too long for its column",
        "reason too long for its column",
        "negative retries break a check constraint",
        "NUL in the task id",
        "x-death count that is no number",
        "failure note that is no JSON",
    ],
)
def test_a_letter_the_database_refuses_gets_a_minimal_row_and_does_not_hold_back_its_batch(how):
    good = [_delivery(), _delivery()]
    poison = _poisoned(how)
    results = dead_letters_archive(deliveries=[good[0], poison, good[1]])

    assert [r.outcome for r in results] == [
        ArchiveOutcome.ARCHIVED,
        ArchiveOutcome.ARCHIVED_MINIMAL,
        ArchiveOutcome.ARCHIVED,
    ]
    for result, delivery in zip([results[0], results[2]], good, strict=True):
        assert result.dead_letter.body_encoding == DeadLetter.BodyEncoding.UTF8
        assert result.dead_letter.task_id == delivery["headers"]["id"]
    minimal = DeadLetter.objects.get(pk=results[1].dead_letter.pk)
    assert minimal.body_encoding == DeadLetter.BodyEncoding.BASE64
    assert replay_message(minimal)[0] == body_bytes(poison["body"], "utf-8")
    assert minimal.error_message.startswith("Archived in minimal form")
    assert minimal.error_class
    assert DeadLetter.objects.count() == 3


def test_a_minimal_row_keeps_what_replay_needs():
    poison = _poisoned("task name too long for its column")
    minimal = dead_letter_archive(**poison).dead_letter
    minimal.refresh_from_db()
    assert minimal.error_class == "django.db.utils.DataError"
    assert (minimal.origin_queue, minimal.origin_exchange, minimal.routing_key, minimal.reason) == (
        "analytics",
        "chat_events",
        "chat.message.created",
        "rejected",
    )
    _, properties = replay_message(minimal)
    # The header the column could not hold is kept whole in the headers.
    assert properties["application_headers"]["task"] == poison["headers"]["task"]
    assert properties["application_headers"]["id"] == poison["headers"]["id"]


def test_a_redelivery_of_a_minimal_letter_takes_over_its_row():
    poison = _poisoned("x-death count that is no number")
    first = dead_letter_archive(**poison)
    again = dead_letter_archive(**poison, redelivered=True)
    assert (first.outcome, again.outcome) == (
        ArchiveOutcome.ARCHIVED_MINIMAL,
        ArchiveOutcome.ALREADY_ARCHIVED,
    )
    assert again.dead_letter.pk == first.dead_letter.pk
    assert DeadLetter.objects.count() == 1


def test_headers_jsonb_cannot_hold_are_cleaned_up_not_refused():
    delivery = _delivery()
    delivery["headers"].update({"nan": float("nan"), "nul\x00key": 1, "surrogate": "a\ud800b"})
    result = dead_letter_archive(**delivery)
    assert result.outcome is ArchiveOutcome.ARCHIVED
    result.dead_letter.refresh_from_db()
    assert result.dead_letter.headers["nan"] == "nan"
    assert result.dead_letter.headers["nul\ufffdkey"] == 1
    assert result.dead_letter.headers["surrogate"] == "a?b"


def test_a_letter_not_even_a_minimal_row_can_hold_is_unstorable_and_the_rest_are_archived(
    refuse_dead_letters,
):
    refuse_dead_letters("P0001")
    refused = _delivery()
    refused["headers"][REFUSED_HEADER] = 1
    results = dead_letters_archive(deliveries=[_delivery(), refused, _delivery()])
    assert [r.outcome for r in results] == [
        ArchiveOutcome.ARCHIVED,
        ArchiveOutcome.UNSTORABLE,
        ArchiveOutcome.ARCHIVED,
    ]
    assert not results[1].stored
    assert DeadLetter.objects.count() == 2


def test_a_lost_connection_fails_the_batch_instead_of_storing_minimal_rows(refuse_dead_letters):
    from django.db import OperationalError

    # admin_shutdown: what the server says when it closes the connection.
    refuse_dead_letters("57P01")
    refused = _delivery()
    refused["headers"][REFUSED_HEADER] = 1
    with pytest.raises(OperationalError):
        dead_letters_archive(deliveries=[_delivery(), refused])
    assert not DeadLetter.objects.exists()
