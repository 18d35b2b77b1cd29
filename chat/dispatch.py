"""A consumer's event loop: every event from its sources, handled one at a time as it arrives.

Channels' own loop (channels.utils.await_many_dispatch) calls asyncio.wait() on one task per
source and creates a new task after every event. On a room socket every delivered frame is an
event, so that bookkeeping is paid thousands of times a second. Here one reader task per source
feeds a queue for the whole socket life.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _SourceFailed:
    error: Exception


async def dispatch_in_arrival_order(
    sources: Sequence[Callable[[], Awaitable[Any]]], dispatch: Callable[[Any], Awaitable[None]]
) -> None:
    """Await events from every source and pass each to `dispatch`, one at a time, in arrival order.

    Runs until `dispatch` or a source raises (StopConsumer ends a consumer), and raises that.
    Readers never wait on the queue (it is unbounded, like the queues they read from), so when
    the loop ends each is cancelled while awaiting its source: the Redis pub/sub channel layer
    unsubscribes a channel exactly when its pending receive() is cancelled.
    """
    arrived: asyncio.Queue[Any] = asyncio.Queue()

    async def read(source: Callable[[], Awaitable[Any]]) -> None:
        try:
            while True:
                arrived.put_nowait(await source())
        except Exception as error:  # handed to the dispatching task, which raises it
            arrived.put_nowait(_SourceFailed(error))

    readers = [asyncio.create_task(read(source)) for source in sources]
    try:
        while True:
            event = await arrived.get()
            if isinstance(event, _SourceFailed):
                raise event.error
            await dispatch(event)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
