import re
import uuid
from datetime import UTC, datetime

import pytest
from django.test import Client

from analytics import services
from tests.analytics.test_services import chat_event
from tests.conftest import grant_permission


def client_for(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def analyst(make_user, username: str = "boss", **extra):
    user = make_user(username, is_staff=True, **extra)
    grant_permission(user, "analytics.view_analytics")
    return user


def record(room, author, *message_ids: int) -> None:
    now = datetime.now(UTC)
    services.chat_events_record(
        events=[chat_event(room=room, author=author, message_id=i, created_at=now) for i in message_ids]
    )


@pytest.mark.django_db
def test_analytics_page_renders_charts_for_staff_with_the_permission(make_user, make_room):
    staff = analyst(make_user)
    room = make_room("general")
    services.chat_events_record(
        events=[
            chat_event(room=room, author=staff, message_id=i, created_at=datetime.now(UTC)) for i in (1, 2)
        ]
    )

    response = client_for(staff).get("/analytics/")

    assert response.status_code == 200
    body = response.content.decode()
    for testid in ("minute-chart", "busiest-rooms", "top-users"):
        assert f'data-testid="{testid}"' in body
    assert re.search(r"/static/analytics/charts\.[0-9a-f]{12}\.js", body)  # the hashed, collected name
    assert response.context["busiest_rooms"][0] == {
        "slug": "general",
        "name": "General",
        "count": 2,
        "active_users": 1,
    }
    assert response.context["top_users"] == [{"username": "boss", "count": 2}]
    assert response.context["series"][0]["room"] == "general"
    assert sum(response.context["series"][0]["points"]) == 2


@pytest.mark.django_db
def test_analytics_page_refuses_staff_without_the_permission(make_user):
    response = client_for(make_user("intern", is_staff=True)).get("/analytics/")
    assert response.status_code == 403


@pytest.mark.django_db
def test_analytics_page_refuses_users_without_the_permission(make_user):
    assert client_for(make_user("alice")).get("/analytics/").status_code == 403


@pytest.mark.django_db
def test_analytics_page_redirects_anonymous_to_login():
    response = client_for().get("/analytics/")
    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.django_db
def test_analytics_page_shows_private_rooms_only_to_their_members(make_user, make_room):
    member, outsider = analyst(make_user, "member"), analyst(make_user, "outsider")
    record(make_room("secret", is_private=True, members=(member,)), member, 1, 2)
    record(make_room("general"), member, 3)

    def rooms_shown(user) -> tuple[list[str], list[str]]:
        context = client_for(user).get("/analytics/").context
        return [r["slug"] for r in context["busiest_rooms"]], [s["room"] for s in context["series"]]

    assert rooms_shown(member) == (["secret", "general"], ["secret", "general"])
    assert rooms_shown(outsider) == (["general"], ["general"])


@pytest.mark.django_db
def test_analytics_page_shows_every_room_to_superusers(make_user, make_room):
    author = make_user("author")
    record(make_room("secret", is_private=True, members=(author,)), author, 1)
    root = make_user("root", is_staff=True, is_superuser=True)

    context = client_for(root).get("/analytics/").context

    assert [r["slug"] for r in context["busiest_rooms"]] == ["secret"]


@pytest.mark.django_db
def test_analytics_link_is_shown_only_with_the_permission(make_user):
    assert b'data-testid="nav-analytics"' in client_for(analyst(make_user)).get("/").content
    assert (
        b'data-testid="nav-analytics"' not in client_for(make_user("intern", is_staff=True)).get("/").content
    )


@pytest.mark.django_db
def test_room_api_answers_counts_series_and_active_users(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    room = make_room("general")
    now = datetime.now(UTC)
    services.chat_events_record(
        events=[
            chat_event(room=room, author=alice, message_id=1, created_at=now),
            chat_event(room=room, author=bob, message_id=2, created_at=now),
            chat_event(room=room, author=alice, message_id=3, created_at=now),
        ]
    )

    response = client_for(alice).get("/api/analytics/rooms/general/")

    assert response.status_code == 200
    body = response.json()
    assert body["room"] == "general"
    assert body["message_count"] == 3
    assert body["active_users_today"] == 2
    assert len(body["per_minute"]) == 60
    by_minute = {point["minute"]: point["count"] for point in body["per_minute"]}
    assert by_minute[now.replace(second=0, microsecond=0).isoformat()] == 3
    assert sum(point["count"] for point in body["per_minute"]) == 3


@pytest.mark.django_db
def test_room_api_counts_nothing_before_the_pipeline_has(make_user, make_room):
    make_room("quiet")
    response = client_for(make_user("alice")).get("/api/analytics/rooms/quiet/")
    assert response.json()["message_count"] == 0


@pytest.mark.django_db
def test_room_api_hides_private_room_from_non_member(make_user, make_room):
    member = make_user("member")
    make_room("secret", is_private=True, members=(member,))

    assert client_for(make_user("outsider")).get("/api/analytics/rooms/secret/").status_code == 404
    assert client_for(member).get("/api/analytics/rooms/secret/").status_code == 200


@pytest.mark.django_db
def test_room_api_hides_private_room_from_staff_who_are_not_members(make_user, make_room):
    make_room("secret", is_private=True)
    plain_staff, permitted_staff = make_user("intern", is_staff=True), analyst(make_user)

    for user in (plain_staff, permitted_staff):
        assert client_for(user).get("/api/analytics/rooms/secret/").status_code == 404


@pytest.mark.django_db
def test_room_api_lets_superusers_read_any_room(make_user, make_room):
    make_room("secret", is_private=True)
    root = make_user("root", is_staff=True, is_superuser=True)
    assert client_for(root).get("/api/analytics/rooms/secret/").status_code == 200


@pytest.mark.django_db
def test_room_api_requires_login(make_room):
    make_room("general")
    assert client_for().get("/api/analytics/rooms/general/").status_code == 401


@pytest.mark.django_db
def test_room_api_answers_404_for_unknown_room(make_user):
    response = client_for(make_user("alice")).get(f"/api/analytics/rooms/{uuid.uuid4().hex}/")
    assert response.status_code == 404
