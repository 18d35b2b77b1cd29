"""`manage.py seed_demo`: demo users, rooms and history, only into an empty database."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from chat.demo import DEMO_ADMIN, DEMO_PASSWORD, DEMO_USERS
from chat.models import Message, Room

pytestmark = pytest.mark.django_db(transaction=True)


def seed_demo() -> str:
    out = io.StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue()


def logs_in(username: str, password: str) -> bool:
    """Whether the login page accepts these credentials (it redirects to the rooms)."""
    response = Client().post("/accounts/login/", {"username": username, "password": password})
    return response.status_code == 302 and response["Location"] == "/"


def test_seed_demo_fills_an_empty_database_and_prints_logins_that_work():
    output = seed_demo()

    assert "Created demo data." in output
    for name in (*DEMO_USERS, DEMO_ADMIN, DEMO_PASSWORD):
        assert name in output
    assert logs_in(DEMO_USERS[0], DEMO_PASSWORD)
    assert get_user_model().objects.get(username=DEMO_ADMIN).is_staff
    assert Room.objects.filter(is_private=True).exists() and Room.objects.filter(is_private=False).exists()
    for room in Room.objects.all():
        seqs = list(Message.objects.filter(room=room).order_by("id").values_list("seq", flat=True))
        assert seqs == list(range(1, len(seqs) + 1))
    assert Message.objects.exists()


def test_seed_demo_leaves_a_database_with_users_alone(make_user):
    make_user("someone")

    output = seed_demo()

    assert "not loaded" in output
    assert get_user_model().objects.count() == 1
    assert not Room.objects.exists() and not Message.objects.exists()
    assert DEMO_PASSWORD not in output  # no login to offer: "someone" has a password of its own
    assert "No demo logins" in output


def test_seed_demo_run_again_prints_only_the_demo_logins_that_still_work():
    seed_demo()
    changed = get_user_model().objects.get(username=DEMO_USERS[0])
    changed.set_password("chosen-by-alice-1")
    changed.save()

    output = seed_demo()

    assert "not loaded" in output
    logins = next(line for line in output.splitlines() if line.startswith("Demo logins:"))
    assert DEMO_USERS[0] not in logins
    for name in (*DEMO_USERS[1:], DEMO_ADMIN, DEMO_PASSWORD):
        assert name in logins
    assert logs_in(DEMO_USERS[1], DEMO_PASSWORD)


def test_seed_demo_gives_every_demo_user_an_example_address():
    seed_demo()

    emails = dict(get_user_model().objects.values_list("username", "email"))

    assert emails == {name: f"{name}@example.com" for name in (*DEMO_USERS, DEMO_ADMIN)}
