"""Web tier tests: page clients (tests/webtier/clients.py) through the `web_tier` harness fixture
(two web processes behind HAProxy), chatting while web processes or Redis go away."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from chat.models import Message, Room
from tests.conftest import session_cookie
from tests.webtier.clients import PageClient

# Messages a client types a second while the web tier is disturbed: well under the rate limit.
TYPING_PER_SECOND = 2.0
# Upper bound for every client to have everything: a stuck client, not a performance claim.
SETTLE_TIMEOUT_SECONDS = 60.0


@pytest.fixture
def room(make_room) -> Room:
    # A slug of its own: room ids repeat across the test databases of concurrent runs sharing Redis.
    return make_room(f"tier-{uuid.uuid4().hex[:8]}")


@dataclass
class Chat:
    """Page clients of one room, all through the same site address."""

    room: Room
    clients: list[PageClient]
    tasks: list[asyncio.Task]

    async def all_connected(self) -> None:
        async with asyncio.timeout(30):
            await asyncio.gather(*(client.opened.wait() for client in self.clients))

    @contextlib.asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        """Every client types messages, with jittered gaps, until the block ends."""
        stop = asyncio.Event()

        async def type_messages(client: PageClient) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await client.send(f"{client.user} message {n}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), random.uniform(0.5, 1.5) / TYPING_PER_SECOND)

        typists = [asyncio.create_task(type_messages(client)) for client in self.clients]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*typists)

    async def typed(self, count: int) -> None:
        """Wait until each client has typed `count` more messages (while `typing` runs)."""
        targets = {id(client): len(client.sent) + count for client in self.clients}
        async with asyncio.timeout(SETTLE_TIMEOUT_SECONDS):
            while any(len(client.sent) < targets[id(client)] for client in self.clients):  # noqa: ASYNC110
                await asyncio.sleep(0.1)

    async def settled(self) -> None:
        """Wait until every message typed is acknowledged and every client shows every stored one."""

        async def everything_arrived() -> bool:
            stored = await sync_to_async(self.stored_ids)()
            return all(not c.pending and c.message_ids() == stored for c in self.clients)

        async with asyncio.timeout(SETTLE_TIMEOUT_SECONDS):
            # The database holds the truth: polled, there is no event to wait on.
            while not await everything_arrived():  # noqa: ASYNC110
                await asyncio.sleep(0.2)

    def stored_ids(self) -> list[int]:
        return list(Message.objects.filter(room=self.room).order_by("seq").values_list("id", flat=True))

    async def stop(self) -> None:
        await asyncio.gather(*(client.stop() for client in self.clients))
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def assert_nothing_lost_or_doubled(chat: Chat) -> None:
    """Every message typed is stored once and acknowledged, and every client shows exactly the
    room's stored messages, each once, in order, without having been sent an error frame."""
    await chat.settled()
    sent = [client_id for client in chat.clients for client_id in client.sent]
    stored = await sync_to_async(Message.objects.filter(client_id__in=sent).count)()
    assert stored == len(sent)
    stored_ids = await sync_to_async(chat.stored_ids)()
    for client in chat.clients:
        assert client.message_ids() == stored_ids
        assert client.error_frames == []


@pytest.fixture
async def start_chat(room) -> AsyncIterator[Callable[[str, int], Awaitable[Chat]]]:
    """`await start_chat(url, n)`: n page clients of `room` (one user each) connected through `url`."""
    chats: list[Chat] = []

    async def start(http_url: str, count: int) -> Chat:
        users = await sync_to_async(_users)(count)
        cookies = [await sync_to_async(session_cookie)(user) for user in users]
        clients = [
            PageClient(http_url=http_url, room=room.slug, user=user.username, cookie=cookie)
            for user, cookie in zip(users, cookies, strict=True)
        ]
        chat = Chat(room=room, clients=clients, tasks=[asyncio.create_task(c.run()) for c in clients])
        chats.append(chat)
        await chat.all_connected()
        return chat

    yield start
    for chat in chats:
        await chat.stop()


def _users(count: int) -> list:
    model = get_user_model()
    return [model.objects.create_user(f"typist-{n}-{uuid.uuid4().hex[:6]}") for n in range(count)]
