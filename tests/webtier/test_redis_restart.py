"""Redis (the channel layer) restarted under load: the sockets stay open and work again once it is
back, what was stored meanwhile reaches the pages by gap repair, and /healthz says what is down."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from asgiref.sync import sync_to_async

from bench.procfile import free_port, port_open
from chat.models import Message
from infrastructure.health import CONSEQUENCE
from tests.harness import wait_until
from tests.webtier.conftest import assert_nothing_lost_or_doubled

pytestmark = pytest.mark.django_db(transaction=True)


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def health_when(url: str, status: int) -> dict:
    return await asyncio.to_thread(
        wait_until,
        lambda: (answer := health(url))[0] == status and answer[1],
        timeout=30,
        message=f"/healthz never answered {status}",
    )


async def test_redis_restart_under_load_keeps_sockets_and_repairs_the_gap(
    processes, start_web_tier, start_chat
):
    # A Redis of this test's own, on its own port: the shared one serves everyone else.
    port = free_port()
    redis_server = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    redis = processes.start(redis_server, ready=port_open(port), name="redis")
    tier = start_web_tier(REDIS_URL=f"redis://127.0.0.1:{port}/0")
    chat = await start_chat(tier.http_url, 4)

    async with chat.typing():
        await chat.typed(1)
        await asyncio.to_thread(redis.stop)
        down = await health_when(tier.http_url, 503)
        stored_before = await sync_to_async(Message.objects.filter(room=chat.room).count)()
        await chat.typed(2)
        stored_while_down = (
            await sync_to_async(Message.objects.filter(room=chat.room).count)() - stored_before
        )
        redis = processes.start(redis_server, ready=port_open(port), name="redis")
        await health_when(tier.http_url, 200)
        await chat.typed(2)

    await assert_nothing_lost_or_doubled(chat)
    # Live delivery is back: with nobody else typing, no gap repair can bring this one.
    writer, *readers = chat.clients
    client_id = await writer.send("live again")
    await chat.settled()
    probe = next(frame["id"] for frame in writer.shown.values() if frame["client_id"] == client_id)
    assert all(probe in reader.live_ids for reader in readers)
    assert down["status"] == "down: channel_layer"
    assert down["channel_layer"] == f"down: {CONSEQUENCE['channel_layer']}"
    assert stored_while_down >= len(chat.clients)
    assert [code for client in chat.clients for code in client.close_codes] == []
