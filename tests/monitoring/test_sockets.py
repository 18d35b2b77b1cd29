"""Socket-side monitoring: rate-limited frames are counted; staff sockets get alert frames live."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from prometheus_client import REGISTRY

from chatproject.asgi import application
from monitoring.consumers import CLOSE_NOT_STAFF
from monitoring.services import DEAD_LETTERS_KEY, alerts_check
from tests.conftest import grant_permission, session_cookie, site_origin

pytestmark = pytest.mark.django_db(transaction=True)


async def socket_for(user, path: str) -> WebsocketCommunicator:
    cookie = await sync_to_async(session_cookie)(user)
    communicator = WebsocketCommunicator(
        application,
        path,
        headers=[(b"origin", site_origin().encode()), (b"cookie", f"sessionid={cookie}".encode())],
    )
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def test_rate_limited_frame_is_counted(make_user, make_room, settings):
    settings.CHAT_RATE_BURST = 1
    settings.CHAT_RATE_PER_SECOND = 0.01
    alice = await sync_to_async(make_user)("alice")
    await sync_to_async(make_room)("general")
    socket = await socket_for(alice, "/ws/rooms/general/")
    before = REGISTRY.get_sample_value("chat_rate_limited_frames_total")
    try:
        for _ in range(3):
            await socket.send_json_to({"type": "message", "text": "hi", "client_id": str(uuid.uuid4())})
        replies = [await socket.receive_json_from(timeout=5) for _ in range(3)]
    finally:
        await socket.disconnect()

    refused = [r for r in replies if r["type"] == "error" and r["code"] == "rate_limited"]
    assert refused  # the bucket holds one message; the rest are refused
    assert REGISTRY.get_sample_value("chat_rate_limited_frames_total") == before + len(refused)


async def test_staff_socket_receives_alert_frame_when_level_changes(
    make_user, make_dead_letters, settings, broker_url
):
    settings.DLQ_WARNING_COUNT = 1
    ops = await sync_to_async(make_user)("ops", is_staff=True)
    await sync_to_async(grant_permission)(ops, "deadletters.view_deadletter")
    socket = await socket_for(ops, "/ws/alerts/")
    try:
        await sync_to_async(make_dead_letters)(1)
        await sync_to_async(alerts_check)()
        frame = await socket.receive_json_from(timeout=5)
        while frame["key"] != DEAD_LETTERS_KEY:  # queue alerts of this vhost may come first
            frame = await socket.receive_json_from(timeout=5)
    finally:
        await socket.disconnect()

    assert frame["type"] == "alert"
    assert frame["level"] == "WARNING"
    assert frame["state"] == "firing"


async def test_non_staff_alert_socket_is_closed(make_user):
    member = await sync_to_async(make_user)("member")
    socket = await socket_for(member, "/ws/alerts/")

    closed = await socket.receive_output(timeout=5)

    assert closed == {"type": "websocket.close", "code": CLOSE_NOT_STAFF}


async def test_alert_socket_of_staff_without_the_dead_letter_permission_is_closed(make_user):
    intern = await sync_to_async(make_user)("intern", is_staff=True)
    socket = await socket_for(intern, "/ws/alerts/")

    closed = await socket.receive_output(timeout=5)

    assert closed == {"type": "websocket.close", "code": CLOSE_NOT_STAFF}
