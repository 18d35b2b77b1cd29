"""The chat's admin pages: what staff may change there."""

import pytest
from django.test import Client

from chat.models import Room

pytestmark = pytest.mark.django_db


def test_room_form_keeps_last_seq_read_only(make_user, make_room):
    staff = make_user("root", is_staff=True, is_superuser=True)
    room = make_room("general")
    Room.objects.filter(pk=room.pk).update(last_seq=7)
    client = Client()
    client.force_login(staff)

    form = client.get(f"/admin/chat/room/{room.pk}/change/")
    response = client.post(
        f"/admin/chat/room/{room.pk}/change/",
        {"slug": "general", "name": "General", "created_by": staff.pk, "last_seq": "1"},
    )

    assert b'name="last_seq"' not in form.content
    assert response.status_code == 302
    room.refresh_from_db()
    assert room.last_seq == 7
