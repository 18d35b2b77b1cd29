"""Revoked access takes effect on open sockets (chat/access.py), through the full ASGI stack."""

from __future__ import annotations

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from chat import services
from chat.models import Message, Room
from chatproject.asgi import application
from tests.chat.test_consumer import message
from tests.conftest import site_origin

pytestmark = pytest.mark.django_db(transaction=True)

CLOSED_FORBIDDEN = {"type": "websocket.close", "code": 4403}
CLOSED_UNAUTHENTICATED = {"type": "websocket.close", "code": 4401}


@pytest.fixture(autouse=True)
def _no_periodic_recheck(settings):
    """The signals alone must close these sockets; the periodic check is tested on its own."""
    settings.CHAT_ACCESS_RECHECK_SECONDS = 3600


def logged_in_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


async def open_socket(client: Client, slug: str) -> WebsocketCommunicator:
    headers = [
        (b"origin", site_origin().encode()),
        (b"cookie", f"sessionid={client.session.session_key}".encode()),
    ]
    communicator = WebsocketCommunicator(application, f"/ws/rooms/{slug}/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def posts(socket: WebsocketCommunicator, text: str) -> dict:
    """Send a message and return the server's answer to it."""
    sent = message(text)
    await socket.send_json_to(sent)
    while True:
        frame = await socket.receive_json_from(timeout=5)
        if frame.get("client_id") == sent["client_id"]:
            return frame


async def assert_revoked(socket: WebsocketCommunicator, closed: dict, sender: WebsocketCommunicator) -> None:
    """Closed with the expected code, then deaf to the room, and nothing it sends is stored."""
    assert await socket.receive_output(timeout=5) == closed
    await posts(sender, "after the revocation")
    assert await socket.receive_nothing(timeout=0.5)
    stored = await sync_to_async(Message.objects.count)()
    await socket.send_json_to(message("sent after the close"))
    assert await socket.receive_nothing(timeout=0.5)
    assert await sync_to_async(Message.objects.count)() == stored


@pytest.fixture
async def private_room(make_user, make_room):
    """alice and bob, members of the private rooms `leads` and `ops`; each has a logged-in client."""
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    leads = await sync_to_async(make_room)("leads", is_private=True, members=(alice, bob))
    await sync_to_async(make_room)("ops", is_private=True, members=(alice, bob))
    return (
        leads,
        alice,
        bob,
        await sync_to_async(logged_in_client)(alice),
        await sync_to_async(logged_in_client)(bob),
    )


def _service(room: Room, bob) -> None:
    services.room_member_remove(room=room, user=bob)


def _room_side(room: Room, bob) -> None:
    room.members.remove(bob)


def _user_side(room: Room, bob) -> None:
    bob.rooms.remove(room)


def _clear(room: Room, bob) -> None:
    # alice is back in before the commit: her socket checks again and stays.
    with transaction.atomic():
        others = list(room.members.exclude(pk=bob.pk))
        room.members.clear()
        room.members.add(*others)


def _admin_set(room: Room, bob) -> None:
    room.members.set(room.members.exclude(pk=bob.pk))


@pytest.mark.parametrize("remove", [_service, _room_side, _user_side, _clear, _admin_set])
async def test_member_removed_from_private_room_is_closed_with_4403(private_room, remove):
    leads, _, bob, alice_client, bob_client = private_room
    alice = await open_socket(alice_client, "leads")
    bob_in_leads = await open_socket(bob_client, "leads")
    bob_in_ops = await open_socket(bob_client, "ops")

    await sync_to_async(remove)(leads, bob)

    await assert_revoked(bob_in_leads, CLOSED_FORBIDDEN, sender=alice)
    assert await bob_in_ops.receive_nothing(timeout=0.5)
    assert (await posts(bob_in_ops, "still in ops"))["type"] == "message"
    await alice.disconnect()
    await bob_in_ops.disconnect()


async def test_member_removed_from_public_room_keeps_the_socket(make_user, make_room):
    # A public room is open to every logged-in user; membership grants nothing there.
    bob = await sync_to_async(make_user)("bob")
    general = await sync_to_async(make_room)("general", members=(bob,))
    socket = await open_socket(await sync_to_async(logged_in_client)(bob), "general")

    await sync_to_async(services.room_member_remove)(room=general, user=bob)

    assert await socket.receive_nothing(timeout=0.5)
    assert (await posts(socket, "still here"))["type"] == "message"
    await socket.disconnect()


async def test_room_made_private_closes_non_members_with_4403(make_user, make_room):
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    general = await sync_to_async(make_room)("general", members=(alice,))
    alice_socket = await open_socket(await sync_to_async(logged_in_client)(alice), "general")
    bob_socket = await open_socket(await sync_to_async(logged_in_client)(bob), "general")

    general.is_private = True
    await sync_to_async(general.save)()

    await assert_revoked(bob_socket, CLOSED_FORBIDDEN, sender=alice_socket)
    await alice_socket.disconnect()


def _deactivate_service(bob) -> None:
    services.user_deactivate(user=bob)


def _deactivate_admin(bob) -> None:
    bob.is_active = False
    bob.save()


@pytest.mark.parametrize("deactivate", [_deactivate_service, _deactivate_admin])
async def test_deactivated_user_is_closed_with_4401_everywhere(private_room, deactivate):
    _, _, bob, alice_client, bob_client = private_room
    alice = await open_socket(alice_client, "leads")
    bob_in_leads = await open_socket(bob_client, "leads")
    bob_in_ops = await open_socket(bob_client, "ops")

    await sync_to_async(deactivate)(bob)

    await assert_revoked(bob_in_leads, CLOSED_UNAUTHENTICATED, sender=alice)
    assert await bob_in_ops.receive_output(timeout=5) == CLOSED_UNAUTHENTICATED
    await alice.disconnect()


async def test_password_change_closes_the_users_sockets_with_4401(private_room):
    # Every session's auth hash derives from the password: Django logs them all out.
    _, _, bob, alice_client, bob_client = private_room
    alice = await open_socket(alice_client, "leads")
    bob_socket = await open_socket(bob_client, "leads")

    bob.set_password("a-new-password-42")
    await sync_to_async(bob.save)()

    await assert_revoked(bob_socket, CLOSED_UNAUTHENTICATED, sender=alice)
    await alice.disconnect()


async def test_logout_closes_only_that_sessions_sockets_with_4401(private_room):
    _, _, bob, alice_client, bob_client = private_room
    alice = await open_socket(alice_client, "leads")
    laptop = await open_socket(bob_client, "leads")
    phone_client = await sync_to_async(logged_in_client)(bob)
    phone = await open_socket(phone_client, "leads")

    response = await sync_to_async(bob_client.post)("/accounts/logout/")
    assert response.status_code == 302

    await assert_revoked(laptop, CLOSED_UNAUTHENTICATED, sender=alice)
    assert (await posts(phone, "the other session stays"))["type"] == "message"
    await alice.disconnect()
    await phone.disconnect()


def _delete_row(session_key: str) -> None:
    Session.objects.filter(session_key=session_key).delete()  # the admin's bulk delete


def _clearsessions(session_key: str) -> None:
    Session.objects.filter(session_key=session_key).update(expire_date=timezone.now() - timedelta(seconds=1))
    call_command("clearsessions")


@pytest.mark.parametrize("delete", [_delete_row, _clearsessions])
async def test_deleted_session_closes_its_sockets_with_4401(private_room, delete):
    _, _, _, alice_client, bob_client = private_room
    alice = await open_socket(alice_client, "leads")
    bob_socket = await open_socket(bob_client, "leads")

    await sync_to_async(delete)(bob_client.session.session_key)

    await assert_revoked(bob_socket, CLOSED_UNAUTHENTICATED, sender=alice)
    await alice.disconnect()


def _deactivate_unannounced(bob) -> None:
    type(bob).objects.filter(pk=bob.pk).update(is_active=False)  # update() sends no signal


def _expire_session(bob) -> None:
    Session.objects.update(expire_date=timezone.now() - timedelta(seconds=1))


@pytest.mark.parametrize("revoke", [_deactivate_unannounced, _expire_session])
async def test_periodic_check_closes_what_no_signal_reports_with_4401(private_room, settings, revoke):
    settings.CHAT_ACCESS_RECHECK_SECONDS = 0.2
    _, _, bob, _, bob_client = private_room
    bob_socket = await open_socket(bob_client, "leads")

    await sync_to_async(revoke)(bob)

    assert await bob_socket.receive_output(timeout=5) == CLOSED_UNAUTHENTICATED


def _remove_member_unannounced(room: Room, user) -> None:
    with connection.cursor() as cursor:  # raw SQL sends no signal: the socket is not told
        cursor.execute(
            f"DELETE FROM {Room.members.through._meta.db_table} WHERE room_id = %s AND user_id = %s",
            [room.pk, user.pk],
        )


async def test_write_by_a_removed_member_is_not_stored_before_the_socket_knows(private_room):
    leads, _, bob, _, bob_client = private_room
    bob_socket = await open_socket(bob_client, "leads")
    await sync_to_async(_remove_member_unannounced)(leads, bob)

    await bob_socket.send_json_to(message("too late"))

    assert await bob_socket.receive_output(timeout=5) == CLOSED_FORBIDDEN
    assert await sync_to_async(Message.objects.count)() == 0


async def test_write_by_a_deactivated_user_is_not_stored_before_the_socket_knows(private_room):
    _, _, bob, _, bob_client = private_room
    bob_socket = await open_socket(bob_client, "leads")
    await sync_to_async(_deactivate_unannounced)(bob)

    await bob_socket.send_json_to(message("too late"))

    assert await bob_socket.receive_output(timeout=5) == CLOSED_UNAUTHENTICATED
    assert await sync_to_async(Message.objects.count)() == 0


async def test_deleted_room_closes_its_sockets_with_4404(private_room):
    leads, _, _, alice_client, _ = private_room
    alice = await open_socket(alice_client, "leads")

    await sync_to_async(leads.delete)()

    assert await alice.receive_output(timeout=5) == {"type": "websocket.close", "code": 4404}


@pytest.mark.django_db(transaction=True)
def test_revocation_with_redis_down_is_committed_and_says_so(make_user, make_room, settings, caplog):
    bob = make_user("bob")
    leads = make_room("leads", is_private=True, members=(bob,))
    layers = settings.CHANNEL_LAYERS
    settings.CHANNEL_LAYERS = {"default": {**layers["default"], "CONFIG": {"hosts": ["redis://127.0.0.1:1"]}}}

    services.room_member_remove(room=leads, user=bob)

    assert not leads.members.exists()
    assert "Redis is unavailable" in caplog.text
