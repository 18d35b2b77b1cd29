"""A web process killed outright (SIGKILL) under load: its pages reconnect through the load balancer
to another process, resend what was not acknowledged and catch up; nothing is lost or doubled."""

from __future__ import annotations

import asyncio

import pytest

from tests.webtier.conftest import assert_nothing_lost_or_doubled

pytestmark = pytest.mark.django_db(transaction=True)

# A socket that ends without a close frame (the process is gone), as the client reports it.
CLOSE_ABNORMAL = 1006


async def test_killed_web_process_pages_reconnect_to_another_and_lose_nothing(web_tier, start_chat):
    chat = await start_chat(web_tier.http_url, 6)
    killed, surviving = web_tier.servers

    async with chat.typing():
        await chat.typed(2)
        await asyncio.to_thread(killed.kill)
        await chat.all_connected()
        await chat.typed(2)

    # Three sockets were on the killed process: each closed abnormally, and the first attempt to
    # reconnect, a jittered half second later, already reached the surviving process.
    assert sorted(code for client in chat.clients for code in client.close_codes) == [CLOSE_ABNORMAL] * 3
    assert sum(client.failed_connects for client in chat.clients) == 0
    sessions = web_tier.sessions()
    assert sessions[surviving.port] == 6
    await assert_nothing_lost_or_doubled(chat)
    reconnects = [seconds for client in chat.clients for seconds in client.reconnect_seconds]
    print(f"reconnected after {', '.join(f'{s:.2f}' for s in sorted(reconnects))} s")
