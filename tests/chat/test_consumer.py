"""The room socket through the full ASGI stack (Origin check, session auth, routing)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
import redis.asyncio
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from chat import consumers, services
from chat.models import Message
from chatproject.asgi import application
from tests.conftest import session_cookie, site_origin

# A fixed client id in the parametrized frames: pytest-xdist workers must collect the same test ids.
CLIENT_ID = "7a699899-c0d2-4c6f-9412-a96022ded71b"
pytestmark = pytest.mark.django_db(transaction=True)


async def connect(user=None, slug="general", *, since=None, origin=None):
    headers = [(b"origin", (origin or site_origin()).encode())]
    if user is not None:
        cookie = await sync_to_async(session_cookie)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    path = f"/ws/rooms/{slug}/" + (f"?since={since}" if since is not None else "")
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await communicator.connect()
    return communicator, connected, code


def message(text="hello", client_id=None):
    return {"type": "message", "text": text, "client_id": str(client_id or uuid.uuid4())}


async def reply_to(communicator, client_id):
    """The server's answer to one frame, skipping live frames of other senders."""
    while True:
        frame = await communicator.receive_json_from(timeout=5)
        if frame.get("client_id") == client_id:
            return frame


@pytest.fixture
async def alice_bob_in_general(make_user, make_room):
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    await sync_to_async(make_room)("general")
    return alice, bob


async def test_message_is_stored_then_acked_to_sender_and_broadcast(alice_bob_in_general):
    alice, bob = alice_bob_in_general
    a, _, _ = await connect(alice)
    b, _, _ = await connect(bob)
    sent = message("hi bob")
    await a.send_json_to(sent)
    ack = await a.receive_json_from(timeout=5)
    live = await b.receive_json_from(timeout=5)
    assert ack == live
    assert ack["type"] == "message" and ack["client_id"] == sent["client_id"]
    assert ack["user"] == "alice" and ack["text"] == "hi bob" and ack["seq"] == 1
    stored = await sync_to_async(Message.objects.get)(id=ack["id"])
    assert stored.text == "hi bob"
    assert await a.receive_nothing(timeout=0.3), "the sender must get its message once, not twice"
    await a.disconnect()
    await b.disconnect()


async def test_resend_with_same_client_id_returns_stored_message(alice_bob_in_general):
    alice, bob = alice_bob_in_general
    a, _, _ = await connect(alice)
    b, _, _ = await connect(bob)
    sent = message("once")
    await a.send_json_to(sent)
    first = await a.receive_json_from(timeout=5)
    await b.receive_json_from(timeout=5)
    await a.send_json_to(sent)
    again = await a.receive_json_from(timeout=5)
    assert again == first
    # Rebroadcast (the first try may have committed unannounced); the same id, nothing new.
    assert (await b.receive_json_from(timeout=5))["id"] == first["id"]
    assert await a.receive_nothing(timeout=0.3), "the sender gets its ack once"
    assert await sync_to_async(Message.objects.count)() == 1
    await a.disconnect()
    await b.disconnect()


async def test_anonymous_socket_is_closed_with_4401(alice_bob_in_general):
    communicator, connected, _ = await connect(None)
    assert connected
    closed = await communicator.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4401}


async def test_unknown_room_is_closed_with_4404(alice_bob_in_general):
    alice, _ = alice_bob_in_general
    communicator, _, _ = await connect(alice, slug="nowhere")
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4404}


async def test_private_room_refuses_non_member_with_4403(alice_bob_in_general, make_room):
    alice, bob = alice_bob_in_general
    await sync_to_async(make_room)("leads", is_private=True, members=(alice,))
    communicator, _, _ = await connect(bob, slug="leads")
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4403}
    member, _, _ = await connect(alice, slug="leads")
    await member.send_json_to(message())
    assert (await member.receive_json_from(timeout=5))["room"] == "leads"
    await member.disconnect()


async def test_foreign_origin_is_refused_at_handshake(alice_bob_in_general):
    alice, _ = alice_bob_in_general
    _, connected, _ = await connect(alice, origin="http://evil.example")
    assert not connected
    assert await sync_to_async(Message.objects.count)() == 0


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        (json.dumps([1, 2]), "invalid_message"),
        (json.dumps({"type": "dance", "client_id": CLIENT_ID}), "invalid_message"),
        (json.dumps({"type": "message", "text": "  ", "client_id": CLIENT_ID}), "invalid_message"),
        (json.dumps({"type": "message", "text": "hi", "client_id": "nope"}), "invalid_message"),
        (json.dumps({"type": "message", "client_id": CLIENT_ID}), "invalid_message"),
        (json.dumps({"type": "message", "text": "x" * 4001, "client_id": CLIENT_ID}), "too_long"),
        (json.dumps({"type": "message", "text": "x" * 70_000, "client_id": "a"}), "frame_too_large"),
        (
            json.dumps({"type": "message", "text": "a\u0000b", "client_id": CLIENT_ID}),
            "invalid_message",
        ),
        (f'{{"type": "message", "text": "\\ud800", "client_id": "{CLIENT_ID}"}}', "invalid_message"),
        (json.dumps({"type": "notification_ack", "id": "not-a-uuid"}), "invalid_message"),
    ],
)
async def test_bad_frame_gets_error_and_socket_stays_usable(alice_bob_in_general, frame, code):
    alice, _ = alice_bob_in_general
    a, _, _ = await connect(alice)
    await a.send_to(text_data=frame)
    error = await a.receive_json_from(timeout=5)
    assert error["type"] == "error" and error["code"] == code and error["detail"]
    await a.send_json_to(message("still here"))
    assert (await a.receive_json_from(timeout=5))["text"] == "still here"
    assert await sync_to_async(Message.objects.count)() == 1
    await a.disconnect()


async def test_deeply_nested_frame_is_invalid_json_and_logs_no_error(alice_bob_in_general, caplog):
    alice, _ = alice_bob_in_general
    a, _, _ = await connect(alice)
    depth = 10_000  # 20 kB: within the frame limit, far past the JSON parser's recursion limit
    await a.send_to(text_data="[" * depth + "]" * depth)
    error = await a.receive_json_from(timeout=5)
    assert (error["type"], error["code"]) == ("error", "invalid_json")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await a.send_json_to(message("still here"))
    assert (await a.receive_json_from(timeout=5))["text"] == "still here"
    await a.disconnect()


async def test_error_echoes_client_id(alice_bob_in_general):
    alice, _ = alice_bob_in_general
    a, _, _ = await connect(alice)
    client_id = str(uuid.uuid4())
    await a.send_json_to({"type": "message", "text": "x" * 4001, "client_id": client_id})
    assert (await a.receive_json_from(timeout=5))["client_id"] == client_id
    await a.disconnect()


@override_settings(CHAT_RATE_PER_SECOND=0.001, CHAT_RATE_BURST=3)
async def test_flood_is_rate_limited_per_user_across_sockets(alice_bob_in_general):
    alice, _ = alice_bob_in_general
    first, _, _ = await connect(alice)
    second, _, _ = await connect(alice)
    replies = []
    for socket in (first, second, first, second, first):
        sent = message()
        await socket.send_json_to(sent)
        replies.append(await reply_to(socket, sent["client_id"]))
    assert [r["type"] for r in replies] == ["message", "message", "message", "error", "error"]
    assert replies[-1]["code"] == "rate_limited"
    assert await sync_to_async(Message.objects.count)() == 3
    await first.disconnect()
    await second.disconnect()


@override_settings(CHAT_RATE_PER_SECOND=0.001, CHAT_RATE_BURST=1)
async def test_one_users_flood_does_not_limit_another_user(alice_bob_in_general):
    alice, bob = alice_bob_in_general
    a, _, _ = await connect(alice)
    b, _, _ = await connect(bob)
    for expected in ("message", "error"):
        sent = message()
        await a.send_json_to(sent)
        assert (await reply_to(a, sent["client_id"]))["type"] == expected
    sent = message("bob's own bucket")
    await b.send_json_to(sent)
    assert (await reply_to(b, sent["client_id"]))["type"] == "message"
    await a.disconnect()
    await b.disconnect()


async def test_since_replays_missed_messages_then_synced(alice_bob_in_general):
    alice, bob = alice_bob_in_general
    room = await sync_to_async(services.Room.objects.get)(slug="general")
    stored = []
    for text in ("one", "two", "three"):
        result = await sync_to_async(services.message_create)(
            room=room, author=alice, text=text, client_id=uuid.uuid4()
        )
        stored.append(result.message)
    b, _, _ = await connect(bob, since=stored[0].id)
    replay = [await b.receive_json_from(timeout=5) for _ in range(3)]
    assert [f.get("text") for f in replay[:2]] == ["two", "three"]
    assert replay[2] == {"type": "synced", "last_id": stored[2].id}
    await b.disconnect()


async def test_message_stored_during_the_replay_arrives_live_after_synced(alice_bob_in_general, monkeypatch):
    """The socket joins the room's group before reading the backlog, so nothing falls in between."""
    alice, bob = alice_bob_in_general
    room = await sync_to_async(services.Room.objects.get)(slug="general")
    first = await sync_to_async(services.message_create)(
        room=room, author=alice, text="before", client_id=uuid.uuid4()
    )
    read_backlog = consumers._missed_frames

    async def backlog_then_a_new_message(*args, **kwargs):
        frames = await read_backlog(*args, **kwargs)
        # Stored (and broadcast) after the backlog was read, before the replay is sent.
        await sync_to_async(services.message_create)(
            room=room, author=alice, text="in between", client_id=uuid.uuid4()
        )
        return frames

    monkeypatch.setattr(consumers, "_missed_frames", backlog_then_a_new_message)
    b, _, _ = await connect(bob, since=first.message.id - 1)
    assert (await b.receive_json_from(timeout=5))["text"] == "before"
    assert (await b.receive_json_from(timeout=5))["type"] == "synced"
    assert (await b.receive_json_from(timeout=5))["text"] == "in between"
    await b.disconnect()


@override_settings(CHAT_REPLAY_LIMIT=2)
async def test_since_with_too_many_missed_asks_for_resync(alice_bob_in_general):
    alice, bob = alice_bob_in_general
    room = await sync_to_async(services.Room.objects.get)(slug="general")
    for _ in range(3):
        await sync_to_async(services.message_create)(
            room=room, author=alice, text="x", client_id=uuid.uuid4()
        )
    b, _, _ = await connect(bob, since=0)
    assert await b.receive_json_from(timeout=5) == {"type": "resync"}
    await b.disconnect()


async def test_unexpected_failure_answers_internal_error_and_the_socket_lives(
    alice_bob_in_general, monkeypatch
):
    alice, _ = alice_bob_in_general
    take_token = consumers.take_message_token
    failures = [RuntimeError("a bug")]

    async def failing_once(user_id):
        if failures:
            raise failures.pop()
        return await take_token(user_id)

    monkeypatch.setattr(consumers, "take_message_token", failing_once)
    a, _, _ = await connect(alice)
    await a.send_json_to(message("first try"))
    assert (await a.receive_json_from(timeout=5))["code"] == "internal_error"
    await a.send_json_to(message("second try"))
    assert (await a.receive_json_from(timeout=5))["text"] == "second try"
    assert await sync_to_async(Message.objects.count)() == 1
    await a.disconnect()


async def test_message_text_never_reaches_logs(alice_bob_in_general, caplog):
    alice, _ = alice_bob_in_general
    a, _, _ = await connect(alice)
    secret = "secret-text-" + uuid.uuid4().hex
    await a.send_json_to(message(secret))
    await a.receive_json_from(timeout=5)
    await a.send_to(text_data=json.dumps({"type": "message", "text": secret * 400, "client_id": "x"}))
    await a.receive_json_from(timeout=5)
    assert secret not in caplog.text
    await a.disconnect()


async def test_a_closed_socket_leaves_no_channel_subscribed_in_redis(alice_bob_in_general, settings):
    # The socket's own channel is a Redis pub/sub subscription; the layer drops it only when the
    # consumer's pending receive() is cancelled (chat.dispatch). A leak would grow per socket.
    alice, _ = alice_bob_in_general
    pattern = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] + "specific.*"
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        communicator, connected, _ = await connect(alice)
        assert connected
        await communicator.send_json_to(message("busy socket"))
        await communicator.receive_json_from(timeout=5)
        assert len(await client.pubsub_channels(pattern)) == 1

        await communicator.disconnect()

        for _ in range(50):
            if not await client.pubsub_channels(pattern):
                break
            await asyncio.sleep(0.1)
        assert await client.pubsub_channels(pattern) == []
    finally:
        await client.aclose()
