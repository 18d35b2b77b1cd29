"""A room page's socket rules (chat/static/chat/room.js, docs/protocol.md), kept by a Python client
so that tests can run dozens of them through the load balancer while web processes restart or die.

Like the page, a `PageClient`:
- keeps each message it types pending until the server acknowledges its client_id, and resends
  every pending one (same client_id) whenever a socket opens;
- connects with `?since=<last id with nothing missing before it>` and shows each id once;
- fetches a jump in `seq` from the history API (`after=`), since live delivery is at-most-once;
- reconnects at once after a 1012 close (service restart), otherwise after a jittered backoff
  (half to all of 0.5 s, 1 s, 2 s, ... up to 20 s; reset once the server says `synced`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

CLOSE_SERVICE_RESTART = 1012
RECONNECT_BASE_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 20.0
# As the page: live frames of one room may overtake each other; wait this long before asking the API.
GAP_GRACE_SECONDS = 0.3


@dataclass
class PageClient:
    """One room page of `user` (whose session cookie is `cookie`) on the site at `http_url`."""

    http_url: str
    room: str
    user: str
    cookie: str
    shown: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> message frame
    live_ids: set[int] = field(default_factory=set)  # ids that came over a socket, not the API
    pending: dict[str, str] = field(default_factory=dict)  # client_id -> text
    sent: list[str] = field(default_factory=list)  # every client_id typed, in order
    close_codes: list[int | None] = field(default_factory=list)
    error_frames: list[dict[str, Any]] = field(default_factory=list)
    # Seconds from each close to the next socket's open, and the attempts that failed meanwhile.
    reconnect_seconds: list[float] = field(default_factory=list)
    failed_connects: int = 0
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    last_id: int = 0
    last_seq: int = 0
    max_seq: int = 0
    _ids_by_seq: dict[int, int] = field(default_factory=dict)
    _socket: ClientConnection | None = None
    _stopping: bool = False
    _gap_task: asyncio.Task | None = None

    @property
    def origin(self) -> str:
        return self.http_url

    def message_ids(self) -> list[int]:
        """The ids the page shows, in seq order."""
        return [frame["id"] for frame in sorted(self.shown.values(), key=lambda frame: frame["seq"])]

    async def run(self) -> None:
        """Keep a socket open until `stop`, reconnecting like the page."""
        attempts = 0
        closed_at: float | None = None
        while not self._stopping:
            ws_url = self.http_url.replace("http://", "ws://", 1)
            try:
                self._socket = await connect(
                    f"{ws_url}/ws/rooms/{self.room}/?since={self.last_id}",
                    origin=self.origin,
                    additional_headers={"Cookie": f"sessionid={self.cookie}"},
                    compression=None,
                    proxy=None,
                    open_timeout=10,
                )
            except Exception:  # refused, 503 from the balancer, a timeout: wait and try again
                self._socket = None
                self.failed_connects += 1
                attempts += 1
                await asyncio.sleep(_backoff(attempts))
                continue
            if closed_at is not None:
                self.reconnect_seconds.append(time.monotonic() - closed_at)
                closed_at = None
            self.opened.set()
            for client_id in list(self.pending):
                await self._transmit(client_id)
            try:
                async for raw in self._socket:
                    if self._frame(json.loads(raw)) == "synced":
                        attempts = 0
            except ConnectionClosed:
                pass
            code = self._socket.close_code
            self._socket = None
            self.opened.clear()
            if self._stopping:
                break
            self.close_codes.append(code)
            closed_at = time.monotonic()
            if code == CLOSE_SERVICE_RESTART:
                continue
            attempts += 1
            await asyncio.sleep(_backoff(attempts))

    async def send(self, text: str) -> str:
        """Type a message: pending until acknowledged; sent now when a socket is open."""
        client_id = str(uuid.uuid4())
        self.pending[client_id] = text
        self.sent.append(client_id)
        await self._transmit(client_id)
        return client_id

    async def stop(self) -> None:
        self._stopping = True
        if self._gap_task is not None:
            self._gap_task.cancel()
        if self._socket is not None:
            await self._socket.close()

    async def _transmit(self, client_id: str) -> None:
        socket = self._socket
        if socket is None:
            return  # sent when the next socket opens
        frame = {"type": "message", "text": self.pending[client_id], "client_id": client_id}
        try:
            await socket.send(json.dumps(frame))
        except ConnectionClosed:
            pass  # still pending: resent when the next socket opens

    def _frame(self, frame: dict[str, Any]) -> str:
        kind = frame.get("type")
        if kind == "message" and frame["room"] == self.room:
            self.live_ids.add(frame["id"])
            self._receive(frame)
            self._gap_check()
        elif kind == "synced":
            self._gap_check()
        elif kind == "resync":
            self.max_seq = max(self.max_seq, self.last_seq + 1)  # fetch everything after last_id
            self._gap_check()
        elif kind == "error":
            self.error_frames.append(frame)
        return kind

    def _receive(self, frame: dict[str, Any]) -> None:
        if frame["user"] == self.user:
            self.pending.pop(frame["client_id"], None)
        self.shown.setdefault(frame["id"], frame)
        self._ids_by_seq[frame["seq"]] = frame["id"]
        self.max_seq = max(self.max_seq, frame["seq"])
        while self.last_seq + 1 in self._ids_by_seq:
            self.last_seq += 1
            self.last_id = self._ids_by_seq[self.last_seq]

    def _gap_check(self) -> None:
        if self.max_seq > self.last_seq and (self._gap_task is None or self._gap_task.done()):
            self._gap_task = asyncio.create_task(self._gap_fill())

    async def _gap_fill(self) -> None:
        await asyncio.sleep(GAP_GRACE_SECONDS)
        while self.max_seq > self.last_seq:
            cursor = self.last_id
            try:
                page = await asyncio.to_thread(self._history_after, cursor)
            except OSError:
                await asyncio.sleep(GAP_GRACE_SECONDS)
                continue
            for frame in page["messages"]:
                self._receive(frame)
            if not page["has_more"] or self.last_id == cursor:
                return  # a stuck cursor waits for the next frame, as the page does

    def _history_after(self, after: int) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.http_url}/api/rooms/{self.room}/messages?after={after}&limit=100",
            headers={"Cookie": f"sessionid={self.cookie}", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def _backoff(attempts: int) -> float:
    ceiling = min(RECONNECT_MAX_SECONDS, RECONNECT_BASE_SECONDS * 2 ** (attempts - 1))
    return ceiling / 2 + random.random() * ceiling / 2
