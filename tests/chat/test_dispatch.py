"""chat.dispatch: a room socket's event loop (RoomConsumer.__call__)."""

import asyncio

import pytest
from channels.exceptions import StopConsumer

from chat.dispatch import dispatch_in_arrival_order


class Source:
    """An awaitable source like a channel layer's receive(): events put in come out in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled_while_waiting = False

    async def __call__(self):
        try:
            return await self.queue.get()
        except asyncio.CancelledError:
            self.cancelled_while_waiting = True
            raise


async def test_events_of_every_source_are_dispatched_one_at_a_time_in_arrival_order():
    client, layer = Source(), Source()
    handled, running = [], []

    async def dispatch(event):
        running.append(event)
        assert len(running) == 1, "two events were handled at once"
        await asyncio.sleep(0.01)  # a handler that awaits: the next event must still wait for it
        handled.append(event)
        running.remove(event)
        if event == "stop":
            raise StopConsumer

    loop = asyncio.create_task(dispatch_in_arrival_order([client, layer], dispatch))
    arrival = ["client 1", "layer 1", "layer 2", "client 2", "layer 3", "stop"]
    for event in arrival:
        (client if event.startswith(("client", "stop")) else layer).queue.put_nowait(event)
        await asyncio.sleep(0.002)  # each arrives while an earlier one may still be handled

    with pytest.raises(StopConsumer):
        await asyncio.wait_for(loop, timeout=5)
    assert handled == arrival


async def test_when_the_loop_ends_every_reader_is_cancelled_inside_its_source():
    # The Redis pub/sub layer unsubscribes a channel only when its pending receive() is cancelled.
    client, layer = Source(), Source()

    async def dispatch(event):
        raise StopConsumer

    client.queue.put_nowait("websocket.disconnect")
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(dispatch_in_arrival_order([client, layer], dispatch), timeout=5)

    assert client.cancelled_while_waiting and layer.cancelled_while_waiting


async def test_a_failing_source_ends_the_loop_with_its_error():
    healthy = Source()

    async def broken():
        raise ConnectionError("Redis went away")

    async def dispatch(event):
        pass

    with pytest.raises(ConnectionError, match="Redis went away"):
        await asyncio.wait_for(dispatch_in_arrival_order([healthy, broken], dispatch), timeout=5)
    assert healthy.cancelled_while_waiting
