"""Several web processes behind the load balancer act as one site: no sticky sessions needed."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


async def test_two_clients_on_different_processes_see_each_others_messages(web_tier, start_chat):
    chat = await start_chat(web_tier.http_url, 2)
    alice, bob = chat.clients

    # leastconn put one socket on each process.
    assert sorted(web_tier.sessions().values()) == [1, 1]
    await alice.send("from the first process")
    await bob.send("from the second process")
    await chat.settled()

    for client in chat.clients:
        assert sorted(frame["text"] for frame in client.shown.values()) == [
            "from the first process",
            "from the second process",
        ]


def test_healthz_through_the_load_balancer_answers_for_every_service(web_tier):
    with urllib.request.urlopen(f"{web_tier.http_url}/healthz", timeout=10) as response:
        body = json.loads(response.read())

    assert body == {"web": "ok", "database": "ok", "channel_layer": "ok", "broker": "ok", "status": "ok"}
