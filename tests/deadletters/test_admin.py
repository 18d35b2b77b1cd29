"""The "Dead letters" admin: staff only, read-only detail, replay/discard with confirmation and audit."""

from __future__ import annotations

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client
from django.urls import reverse

from deadletters.models import DeadLetter, DeadLetterAction
from deadletters.services.task_failures import task_failure_record
from tests.conftest import grant_permission
from tests.deadletters.conftest import archive_letter

CHANGELIST = "admin:deadletters_deadletter_changelist"


@pytest.fixture
def staff_client(make_user) -> Client:
    user = make_user("operator", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    client.user = user  # type: ignore[attr-defined]
    return client


@pytest.fixture
def poison(db) -> DeadLetter:
    letter = archive_letter(task_id="task-poison-1")
    task_failure_record(
        task_id="task-poison-1",
        task_name="analytics.record_chat_events",
        error_class="analytics.services.InvalidEvent",
        error_message="event_id must be a UUID, got 'x'",
        traceback='Traceback (most recent call last):\n  File "analytics/tasks.py"\nInvalidEvent',
        attempts=1,
    )
    letter.refresh_from_db()
    return letter


def _admin_urls(letter: DeadLetter) -> list[str]:
    changelist = reverse(CHANGELIST)
    return [
        changelist,
        f"{changelist}?origin_queue__exact=analytics&reason__exact=rejected&status__exact=new",
        f"{changelist}?q=InvalidEvent",
        reverse("admin:deadletters_deadletter_change", args=[letter.pk]),
        reverse("admin:deadletters_broker_status"),
    ]


@pytest.mark.broker
def test_admin_pages_answer_200_for_staff(staff_client, poison, broker_url):
    for url in _admin_urls(poison):
        assert staff_client.get(url).status_code == 200, url


@pytest.mark.broker
def test_admin_pages_answer_200_for_staff_with_the_view_permission_only(make_user, poison, broker_url):
    viewer = make_user("viewer", is_staff=True)
    grant_permission(viewer, "deadletters.view_deadletter")
    client = Client()
    client.force_login(viewer)
    for url in _admin_urls(poison):
        assert client.get(url).status_code == 200, url


def test_admin_pages_refuse_staff_without_the_view_permission(make_user, poison):
    client = Client()
    client.force_login(make_user("intern", is_staff=True))
    for url in _admin_urls(poison):
        assert client.get(url).status_code == 403, url


def test_admin_pages_send_anonymous_users_to_the_login_page(poison):
    for url in _admin_urls(poison):
        response = Client().get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login")), url


def test_admin_pages_refuse_non_staff(make_user, poison):
    client = Client()
    client.force_login(make_user("member"))
    for url in _admin_urls(poison):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login")), url


def test_detail_page_shows_traceback_x_death_payload_and_headers(staff_client, poison):
    page = staff_client.get(reverse("admin:deadletters_deadletter_change", args=[poison.pk])).content.decode()
    assert "InvalidEvent" in page
    assert "Traceback (most recent call last)" in page
    assert "<th>routing keys</th>" in page  # the x-death history table
    assert "<td>analytics</td><td>rejected</td>" in page
    assert "&quot;event_id&quot;" in page  # pretty-printed payload
    assert "&quot;task&quot;: &quot;analytics.record_chat_events&quot;" in page  # headers


def test_changelist_search_finds_letters_by_payload(staff_client, poison):
    event_id = poison.body.split('"event_id":"')[1].split('"')[0]
    found = staff_client.get(reverse(CHANGELIST), {"q": event_id}).context["cl"].result_count
    missing = staff_client.get(reverse(CHANGELIST), {"q": "no-such-payload"}).context["cl"].result_count
    assert (found, missing) == (1, 0)


def test_replay_action_asks_for_confirmation_with_the_count(staff_client, poison):
    response = staff_client.post(
        reverse(CHANGELIST),
        {"action": "replay_dead_letters", "_selected_action": [poison.pk], "index": 0, "select_across": 0},
    )
    assert response.status_code == 200
    assert "You are about to replay <strong>1</strong> dead letter" in response.content.decode()
    poison.refresh_from_db()
    assert poison.status == DeadLetter.Status.NEW


@pytest.mark.broker
def test_confirmed_replay_action_republishes_and_logs_who_did_it(staff_client, poison, broker_url):
    response = staff_client.post(
        reverse(CHANGELIST),
        {
            "action": "replay_dead_letters",
            "_selected_action": [poison.pk],
            "select_across": "0",
            "confirm": "yes",
        },
    )
    assert response.status_code == 302
    poison.refresh_from_db()
    assert (poison.status, poison.replay_count) == (DeadLetter.Status.REPLAYED, 1)
    action = DeadLetterAction.objects.get(dead_letter=poison)
    assert (action.kind, action.actor, action.actor_label) == ("replayed", staff_client.user, "operator")
    entry = LogEntry.objects.get(object_id=str(poison.pk))
    assert entry.user == staff_client.user
    assert "Replayed" in entry.get_change_message()


def test_discard_across_the_current_filter_discards_every_match_and_logs_who(staff_client, db):
    analytics = [archive_letter(queue="analytics") for _ in range(3)]
    other = archive_letter(queue="notifications")
    url = f"{reverse(CHANGELIST)}?origin_queue__exact=analytics"

    confirm_page = staff_client.post(
        url,
        {
            "action": "discard_dead_letters",
            "_selected_action": [analytics[0].pk],
            "index": 0,
            "select_across": 1,
        },
    )
    assert "You are about to discard <strong>3</strong> dead letters" in confirm_page.content.decode()
    staff_client.post(
        url,
        {
            "action": "discard_dead_letters",
            "_selected_action": [analytics[0].pk],
            "select_across": "1",
            "confirm": "yes",
        },
    )

    statuses = dict(DeadLetter.objects.values_list("pk", "status"))
    assert [statuses[letter.pk] for letter in analytics] == ["discarded"] * 3
    assert statuses[other.pk] == "new"
    assert set(DeadLetterAction.objects.values_list("actor_label", flat=True)) == {"operator"}
    assert LogEntry.objects.filter(user=staff_client.user).count() == 3


def test_broker_status_page_says_rabbitmq_is_unreachable_instead_of_failing(staff_client, settings):
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"
    settings.RABBITMQ_MANAGEMENT_URL = ""
    response = staff_client.get(reverse("admin:deadletters_broker_status"))
    assert response.status_code == 200
    assert "unreachable" in response.content.decode()
