"""A web process stopped with SIGTERM hands its pages over to the others, and a rolling restart of
every web process under load loses nothing and shows no error (chatproject/serve.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import pytest

from monitoring.views import LOAD_BALANCER_CHECK_URI, WEB_SHUTTING_DOWN
from tests.harness import wait_until
from tests.webtier.clients import CLOSE_SERVICE_RESTART
from tests.webtier.conftest import assert_nothing_lost_or_doubled

pytestmark = pytest.mark.django_db(transaction=True)


def load_balancer_check(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}{LOAD_BALANCER_CHECK_URI}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sigterm_fails_the_health_check_while_the_process_still_serves(web_tier):
    leaving = web_tier.servers[0]
    assert load_balancer_check(leaving.http_url) == (200, {"web": "ok", "status": "ok"})

    leaving.child.send_signal(signal.SIGTERM)

    body = wait_until(
        lambda: (answer := load_balancer_check(leaving.http_url))[0] == 503 and answer[1],
        timeout=10,
        message="the process never said it was shutting down",
    )
    assert body == {"web": f"down: {WEB_SHUTTING_DOWN}", "status": "down: web"}
    assert leaving.child.wait(timeout=30) == 0


async def test_sigterm_closes_sockets_with_1012_and_their_pages_reconnect_to_the_other_process(
    web_tier, start_chat
):
    chat = await start_chat(web_tier.http_url, 4)
    leaving, staying = web_tier.servers

    async with chat.typing():
        await chat.typed(2)
        leaving.child.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(leaving.child.wait, 30) == 0
        await chat.all_connected()
        await chat.typed(2)

    # Two sockets were on the process that left; they were closed as a restart, and nothing else was.
    assert (
        sorted(code for client in chat.clients for code in client.close_codes) == [CLOSE_SERVICE_RESTART] * 2
    )
    sessions = web_tier.sessions()
    assert sessions[staying.port] == 4
    await assert_nothing_lost_or_doubled(chat)


async def test_rolling_restart_of_every_web_process_under_load_loses_nothing_and_shows_no_error(
    web_tier, start_chat
):
    chat = await start_chat(web_tier.http_url, 6)

    async with chat.typing():
        for server in web_tier.servers:
            await chat.typed(1)
            await asyncio.to_thread(server.restart)
            await asyncio.to_thread(web_tier.wait_balanced)
        await chat.all_connected()
        await chat.typed(1)

    codes = {code for client in chat.clients for code in client.close_codes}
    assert codes == {CLOSE_SERVICE_RESTART}
    assert sum(client.failed_connects for client in chat.clients) == 0
    await assert_nothing_lost_or_doubled(chat)
