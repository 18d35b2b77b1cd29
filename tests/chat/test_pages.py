"""The HTML pages through Django's test client: rooms, room, login, signup."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from chat.models import Room

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def listed_slugs(response) -> list[str]:
    return [room.slug for room in response.context["rooms"]]


def test_rooms_page_lists_public_rooms_and_private_rooms_of_the_user_only(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_room("general")
    make_room("alices-team", is_private=True, members=(alice,))
    make_room("bobs-team", is_private=True, members=(bob,))

    response = client_for(alice).get("/")

    assert response.status_code == 200
    assert listed_slugs(response) == ["alices-team", "general"]
    assert b"/rooms/bobs-team/" not in response.content
    assert b'data-testid="private-badge"' in response.content


def test_create_room_form_creates_the_room_and_redirects_to_it(make_user):
    alice = make_user("alice")

    response = client_for(alice).post("/", {"name": "Design Review", "is_private": "on"})

    room = Room.objects.get(slug="design-review")
    assert response.status_code == 302
    assert response["Location"] == "/rooms/design-review/"
    assert room.is_private and list(room.members.all()) == [alice]


def test_create_room_form_shows_the_error_for_a_taken_name(make_user, make_room):
    alice = make_user("alice")
    make_room("general")

    response = client_for(alice).post("/", {"name": "General"})

    assert response.status_code == 200
    assert "exists already" in response.content.decode()
    assert '<a href="/rooms/general/" data-testid="existing-room">' in response.content.decode()
    assert Room.objects.count() == 1


def test_create_room_form_answers_a_name_of_a_hidden_private_room_as_if_it_were_free(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_room("leads", is_private=True, members=(bob,))

    response = client_for(alice).post("/", {"name": "Leads", "is_private": "on"})

    assert response.status_code == 302
    created = Room.objects.get(created_by=alice)
    assert response["Location"] == f"/rooms/{created.slug}/" == "/rooms/leads-2/"
    assert created.is_private and list(created.members.all()) == [alice]


def test_room_page_is_404_for_a_private_room_non_member(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_room("secret", is_private=True, members=(alice,))

    assert client_for(bob).get("/rooms/secret/").status_code == 404
    assert client_for(alice).get("/rooms/secret/").status_code == 200


def test_room_page_carries_the_client_config_as_json(make_user, make_room, settings):
    alice = make_user("alice")
    make_room("general")

    response = client_for(alice).get("/rooms/general/")

    config = json.loads(_json_script(response, "chat-config"))
    assert config == {
        "room": "general",
        "user": "alice",
        "maxChars": settings.CHAT_MAX_MESSAGE_CHARS,
        "pageSize": settings.CHAT_HISTORY_PAGE,
    }


def _json_script(response, element_id: str) -> str:
    html = response.content.decode()
    start = html.index(f'<script id="{element_id}" type="application/json">') + len(
        f'<script id="{element_id}" type="application/json">'
    )
    return html[start : html.index("</script>", start)]


@pytest.mark.parametrize("path", ["/", "/rooms/general/"])
def test_pages_redirect_anonymous_users_to_login(make_room, path):
    make_room("general")

    response = Client().get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_login_form_logs_the_user_in_and_lands_on_rooms(make_user):
    make_user("alice")
    client = Client()

    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-for-tests-1"})

    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").context["user"].get_username() == "alice"


def test_signup_creates_the_account_and_logs_it_in(db):
    client = Client()

    response = client.post(
        "/accounts/signup/",
        {"username": "dora", "password1": "a-long-pass-phrase-9", "password2": "a-long-pass-phrase-9"},
    )

    assert response.status_code == 302 and response["Location"] == "/"
    assert get_user_model().objects.filter(username="dora").exists()
    assert client.get("/").context["user"].get_username() == "dora"


def test_logout_is_a_post_form_in_the_nav(make_user):
    client = client_for(make_user("alice"))

    page = client.get("/").content.decode()

    assert 'method="post" action="/accounts/logout/"' in page
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert client.get("/").status_code == 302


def test_admin_link_is_shown_to_staff_only(make_user):
    staff, member = make_user("root", is_staff=True), make_user("alice")

    assert b'data-testid="nav-admin"' in client_for(staff).get("/").content
    assert b'data-testid="nav-admin"' not in client_for(member).get("/").content


def test_staff_manage_rooms_and_messages_in_the_admin(make_user):
    staff, member = make_user("root", is_staff=True, is_superuser=True), make_user("alice")

    for path in ("/admin/", "/admin/chat/room/", "/admin/chat/message/"):
        assert client_for(staff).get(path).status_code == 200
        assert client_for(member).get(path).status_code == 302
