"""The room socket on a real daphne process, spoken to by a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.procfile import DaphneServer, free_port
from chat import services
from chat.models import Message, Room
from chat.protocol import room_group
from infrastructure.postgres import database_url
from tests.conftest import session_cookie
from tests.faults.tcp_proxy import TcpProxy
from tests.harness import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def people(make_user, make_room):
    make_room("general")
    return {name: make_user(name) for name in ("alice", "bob", "carol")}


async def open_socket(server, user, slug="general", *, since=None, origin=None, **options):
    cookie = await sync_to_async(session_cookie)(user)
    url = f"{server.ws_url}/ws/rooms/{slug}/" + (f"?since={since}" if since is not None else "")
    return await websockets.connect(
        url,
        origin=origin or f"http://127.0.0.1:{server.port}",
        additional_headers={"Cookie": f"sessionid={cookie}"},
        max_size=None,
        **options,
    )


async def send_message(socket, text):
    frame = {"type": "message", "text": text, "client_id": str(uuid.uuid4())}
    await socket.send(json.dumps(frame))
    return frame


async def next_frame(socket):
    async with asyncio.timeout(5):
        return json.loads(await socket.recv())


async def test_message_fans_out_to_every_socket_in_the_room(live_daphne, people):
    sockets = {name: await open_socket(live_daphne, user) for name, user in people.items()}
    sent = await send_message(sockets["alice"], "hello everyone")
    frames = {name: await next_frame(socket) for name, socket in sockets.items()}
    assert {f["client_id"] for f in frames.values()} == {sent["client_id"]}
    assert len({f["id"] for f in frames.values()}) == 1
    for socket in sockets.values():
        await socket.close()


async def test_resend_after_lost_ack_stores_once(live_daphne, people):
    alice = await open_socket(live_daphne, people["alice"])
    sent = await send_message(alice, "did this arrive?")
    await alice.close()  # the ack may be lost with the connection
    stored = Message.objects.filter(client_id=sent["client_id"])
    # The frame arrived before the close, so the server stores it even though nobody hears the ack.
    await sync_to_async(wait_until)(
        lambda: stored.count() == 1, timeout=10, message="the first send was never stored"
    )
    first_id = await sync_to_async(lambda: stored.get().id)()
    alice = await open_socket(live_daphne, people["alice"])
    await alice.send(json.dumps(sent))
    ack = await next_frame(alice)
    assert ack["client_id"] == sent["client_id"] and ack["id"] == first_id
    assert await sync_to_async(stored.count)() == 1
    await alice.close()


async def test_reconnect_with_since_catches_up_in_order(live_daphne, people):
    bob = await open_socket(live_daphne, people["bob"])
    alice = await open_socket(live_daphne, people["alice"])
    await send_message(alice, "before")
    last_seen = (await next_frame(bob))["id"]
    await bob.close()
    for text in ("missed 1", "missed 2"):
        await send_message(alice, text)
        await next_frame(alice)
    bob = await open_socket(live_daphne, people["bob"], since=last_seen)
    replay = [await next_frame(bob) for _ in range(3)]
    assert [f.get("text") for f in replay[:2]] == ["missed 1", "missed 2"]
    assert replay[1]["seq"] == replay[0]["seq"] + 1
    assert replay[2]["type"] == "synced" and replay[2]["last_id"] == replay[1]["id"]
    await alice.close()
    await bob.close()


async def test_oversized_frame_is_refused_and_server_keeps_serving(live_daphne, people):
    alice = await open_socket(live_daphne, people["alice"])
    await alice.send(json.dumps({"type": "message", "text": "x" * (70 * 1024), "client_id": "a"}))
    # daphne's 64 KiB limit (Procfile) drops the connection before the application reads
    # the frame; without the limit the consumer would answer frame_too_large instead.
    with pytest.raises(ConnectionClosed):
        await next_frame(alice)
    assert await sync_to_async(Message.objects.count)() == 0
    bob = await open_socket(live_daphne, people["bob"])
    await send_message(bob, "still up")
    assert (await next_frame(bob))["text"] == "still up"
    await bob.close()


async def test_malformed_frames_get_errors_on_a_live_socket(live_daphne, people):
    alice = await open_socket(live_daphne, people["alice"])
    await alice.send("{broken")
    assert (await next_frame(alice))["code"] == "invalid_json"
    await alice.send(json.dumps({"type": "message", "text": "x" * 5000, "client_id": str(uuid.uuid4())}))
    assert (await next_frame(alice))["code"] == "too_long"
    await alice.send(b"\xff\xfe binary")
    assert (await next_frame(alice))["code"] == "invalid_json"
    await send_message(alice, "fine")
    assert (await next_frame(alice))["text"] == "fine"
    await alice.close()


async def test_server_log_never_contains_message_text_even_on_refused_frames(live_daphne, people):
    live_daphne.extra_env.update(CHAT_RATE_BURST="1", CHAT_RATE_PER_SECOND="0.001")  # the 2nd is refused
    await sync_to_async(live_daphne.restart)()
    secret = f"secret-{uuid.uuid4().hex}"
    alice = await open_socket(live_daphne, people["alice"])
    bob = await open_socket(live_daphne, people["bob"])

    await send_message(alice, f"stored {secret}")
    assert (await next_frame(alice))["text"] == f"stored {secret}"
    assert (await next_frame(bob))["text"] == f"stored {secret}"
    refused = {
        "too_long": {"type": "message", "text": secret * 200, "client_id": str(uuid.uuid4())},
        "invalid_message": {"type": "shout", "text": secret, "client_id": str(uuid.uuid4())},
    }
    for code, frame in refused.items():
        await alice.send(json.dumps(frame))
        assert (await next_frame(alice))["code"] == code
    for frame in (
        {"type": "message", "text": f"{secret}\x00", "client_id": str(uuid.uuid4())},
        {"type": "message", "text": secret, "client_id": secret},
    ):
        await alice.send(json.dumps(frame))
        assert (await next_frame(alice))["code"] == "invalid_message"
    await alice.send(f'{{"type": "message", "text": "{secret}"')
    assert (await next_frame(alice))["code"] == "invalid_json"
    await send_message(alice, f"too fast {secret}")
    assert (await next_frame(alice))["code"] == "rate_limited"
    await alice.close()
    await bob.close()
    await sync_to_async(live_daphne.stop)()  # everything it wrote is in the file now

    log = live_daphne.log_path.read_text()
    assert f"127.0.0.1:{live_daphne.port}" in log  # the file does hold the server's output
    assert secret not in log


async def test_foreign_origin_is_refused_by_live_server(live_daphne, people):
    with pytest.raises(InvalidStatus) as refused:
        await open_socket(live_daphne, people["alice"], origin="https://attacker.example")
    assert refused.value.response.status_code == 403


async def test_database_outage_answers_unavailable_and_the_resend_is_stored_once(people):
    """PostgreSQL cut off under a connected socket: no ack, an `unavailable` error, the socket lives."""
    proxy = TcpProxy(free_port(), target=("127.0.0.1", 5432))
    proxy.open()
    db_url = database_url({**connection.settings_dict, "HOST": "127.0.0.1", "PORT": proxy.port})
    # One write thread's connection per message is enough to see the outage; no pooling across it.
    server = DaphneServer(port=free_port(), extra_env={"DATABASE_URL": db_url, "DB_CONN_MAX_AGE": "0"})
    await sync_to_async(server.start)()
    try:
        alice = await open_socket(server, people["alice"])
        proxy.close()
        sent = await send_message(alice, "while the database is away")
        error = await next_frame(alice)
        assert error["type"] == "error" and error["code"] == "unavailable"
        assert error["client_id"] == sent["client_id"]
        proxy.open()
        await alice.send(json.dumps(sent))
        ack = await next_frame(alice)
        assert ack["type"] == "message" and ack["client_id"] == sent["client_id"]
        assert await sync_to_async(Message.objects.filter(client_id=sent["client_id"]).count)() == 1
        await alice.close()
    finally:
        await sync_to_async(server.stop)()
        proxy.close()


async def test_member_removed_in_another_process_is_closed_with_4403(live_daphne, make_user, make_room):
    # The revocation commits here; the socket lives in daphne: the event crosses Redis.
    bob = await sync_to_async(make_user)("bob")
    leads = await sync_to_async(make_room)("leads", is_private=True, members=(bob,))
    socket = await open_socket(live_daphne, bob, "leads")

    await sync_to_async(services.room_member_remove)(room=leads, user=bob)

    with pytest.raises(ConnectionClosed) as closed:
        await next_frame(socket)
    assert closed.value.rcvd.code == 4403


async def test_sockets_closing_during_a_broadcast_and_the_shutdown_log_no_error(live_daphne, people):
    """A send to a socket its client is closing, and sockets open at SIGTERM, are ordinary: no ERROR.

    The broadcast keeps group events arriving while sockets close, so some event finds its socket
    closing (the client's close frame received, the TCP connection not yet ended), where daphne
    refuses a send; the last sockets stay open until the server stops.
    """
    room = await sync_to_async(Room.objects.get)(slug="general")
    layer = get_channel_layer()
    broadcasting = True

    async def broadcast() -> None:
        event_id = 0
        while broadcasting:
            event_id += 1
            frame = json.dumps({"type": "message", "id": -event_id, "text": "x" * 200})
            await layer.group_send(
                room_group(room.pk), {"type": "chat.message", "id": -event_id, "frame": frame}
            )
            await asyncio.sleep(0.002)

    broadcaster = asyncio.create_task(broadcast())
    try:
        for _ in range(50):
            # Reading everything (no queue limit), so a close is not held up behind unread frames.
            sockets = [await open_socket(live_daphne, user, max_queue=None) for user in people.values()]
            await asyncio.sleep(0.05)
            await asyncio.gather(*(socket.close() for socket in sockets))
        still_open = [await open_socket(live_daphne, user) for user in people.values()]
        await next_frame(still_open[0])
    finally:
        broadcasting = False
        await broadcaster
    await sync_to_async(live_daphne.stop)()  # SIGTERM with sockets open

    log = live_daphne.log_path.read_text()
    assert " ERROR " not in log and "Traceback" not in log and "Task was destroyed" not in log, log[-3000:]
