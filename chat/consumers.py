"""The room socket: parses frames and calls chat.services; the protocol is chat.protocol."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import redis
from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import InterfaceError, OperationalError

from chat import access, notifications, presence, protocol, selectors, services
from chat.dispatch import dispatch_in_arrival_order
from chat.metrics import CHAT_RATE_LIMITED_FRAMES
from chat.models import Room
from chat.ratelimit import take_message_token
from infrastructure.database_threads import DatabaseThreadPool

logger = logging.getLogger(__name__)


@database_sync_to_async
def _room_for_user(slug: str, user: Any) -> Room:
    return selectors.room_for_user(slug=slug, user=user)


# Writes run off the single thread-sensitive executor so that one slow commit does not
# queue every other socket of the process behind it, in a pool of their own: a write mostly
# waits on PostgreSQL, so a process needs more writes in flight than asyncio's default pool
# (CPUs + 4 threads) allows. Each thread reuses one database connection
# and closes it when idle (infrastructure/database_threads.py).
WRITE_THREADS = 16
_WRITE_EXECUTOR = DatabaseThreadPool(
    size=WRITE_THREADS, name="chat-write", idle_seconds=settings.DB_CONN_IDLE_SECONDS
)
_message_create = database_sync_to_async(
    services.message_create, thread_sensitive=False, executor=_WRITE_EXECUTOR
)
_notification_acknowledge = database_sync_to_async(
    notifications.notification_acknowledge, thread_sensitive=False, executor=_WRITE_EXECUTOR
)
# Notifications a socket keeps as awaiting its page's acknowledgement; a page acknowledges each
# at once, so more means a page that never does, and forgetting them only means their emails go out.
_AWAITED_ACKS_MAX = 100
# Marks the end of a socket's inbox (chat.consumers.RoomConsumer.disconnect).
_INBOX_CLOSED = object()


async def _send_while_open(
    send: Callable[[dict[str, Any]], Awaitable[None]], message: dict[str, Any]
) -> None:
    """The server's send, dropping what comes after the client began to close the socket.

    A group event or a reply can reach a socket whose client has just closed it: daphne marks the
    connection closed only once TCP ends, and until then autobahn raises Disconnected on a send
    (other ASGI servers raise an OSError, as the ASGI spec asks). Nobody is left to read it, and the
    socket's websocket.disconnect follows; raised, it would end the consumer with an ERROR and a
    traceback in the log for an ordinary close.
    """
    try:
        await send(message)
    except (Disconnected, OSError):
        pass


@database_sync_to_async
def _room_access_check(session_key: str | None, user_id: int, room_id: int) -> None:
    selectors.room_access_check(session_key=session_key, user_id=user_id, room_id=room_id)


@database_sync_to_async
def _missed_frames(room: Room, since: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
    messages, has_more = selectors.messages_page(room=room, after=since, limit=limit)
    return [dict(protocol.message_frame(m)) for m in messages], has_more


class RoomConsumer(AsyncWebsocketConsumer):
    room: Room | None = None
    heartbeat: asyncio.Task | None = None
    access_recheck: asyncio.Task | None = None
    inbox_reader: asyncio.Task | None = None
    # Set once the socket's access ended: nothing more is delivered to it or stored from it.
    revoked = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Channels' AsyncConsumer.__call__, with the cheaper event loop of chat.dispatch.

        However it ends (a disconnect, or daphne cancelling it at shutdown, when disconnect() never
        runs), the socket's own tasks end with it, instead of being destroyed still pending.
        """
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.base_send = partial(_send_while_open, send)
        try:
            await dispatch_in_arrival_order(
                [receive, partial(self.channel_layer.receive, self.channel_name)], self.dispatch
            )
        except StopConsumer:
            pass
        finally:
            tasks = [t for t in (self.inbox_reader, self.heartbeat, self.access_recheck) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Every event, without the stale-connection check Channels runs before each handler.

        That check is a hop to the single thread-sensitive executor per event, so every
        delivered frame of the process would queue on one thread. This consumer reaches the
        database only through
        database_sync_to_async, which closes stale connections in its own thread.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        user = self.scope["user"]
        # Accept first so that the close code reaches the client: a refused handshake
        # would only tell it "403", and it could not tell a bad room from a lost session.
        if not user.is_authenticated:
            await self._refuse(protocol.CLOSE_UNAUTHENTICATED)
            return
        slug = self.scope["url_route"]["kwargs"]["slug"]
        try:
            self.room = await _room_for_user(slug, user)
        except selectors.RoomNotFound:
            await self._refuse(protocol.CLOSE_ROOM_NOT_FOUND)
            return
        except selectors.RoomAccessDenied:
            await self._refuse(protocol.CLOSE_FORBIDDEN)
            return
        self.group = protocol.room_group(self.room.pk)
        # Events about a session that ended name it by digest (chat.access.session_digest).
        self.session_key: str | None = self.scope["session"].session_key
        self.session_digest = access.session_digest(self.session_key or "")
        # Ids acknowledged straight to this socket, so their group copy is not sent twice.
        self.acknowledged_ids: set[int] = set()
        # Ids of notifications pushed to this socket and not yet acknowledged by its page: only
        # these may be acknowledged here, so a made-up id costs no query.
        self.awaited_acks: set[str] = set()
        # Join before reading the backlog: a message stored in between arrives live
        # rather than falling between the replay and the subscription.
        await self.channel_layer.group_add(self.group, self.channel_name)
        # Every socket of the user, whatever its room, gets the user's notifications; presence
        # tells the notifier (another process) whether anyone would see a push or needs an email.
        self.user_group = protocol.user_group(user.pk)
        await self.channel_layer.group_add(self.user_group, self.channel_name)
        await presence.presence_socket_open(user_id=user.pk, channel_name=self.channel_name)
        await self.accept()
        # A consumer handles one event at a time: were this socket's frames stored right in
        # receive(), every wait on the database would hold up the room's messages to it (under
        # load, deliveries starved behind the socket's own writes). They are processed in order
        # by a task of their own instead.
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.inbox_reader = asyncio.create_task(self._read_inbox())
        since = self._since_param()
        if since is not None:
            await self._replay_since(since)
        # Started last: a connect() that raised above never gets a disconnect() to cancel them.
        self.heartbeat = asyncio.create_task(
            presence.presence_heartbeat(user_id=user.pk, channel_name=self.channel_name)
        )
        self.access_recheck = asyncio.create_task(self._recheck_access_periodically())

    async def _refuse(self, code: int) -> None:
        await self.accept()
        await self.close(code=code)

    def _since_param(self) -> int | None:
        values = parse_qs(self.scope.get("query_string", b"").decode()).get("since")
        try:
            return int(values[0]) if values else None
        except ValueError:
            return None

    async def _replay_since(self, since: int) -> None:
        try:
            frames, more = await _missed_frames(self.room, since, settings.CHAT_REPLAY_LIMIT)
        except (OperationalError, InterfaceError):
            # The database is not answering: the page reloads history over the API instead.
            await self._send_json(protocol.resync_frame())
            return
        if more:
            await self._send_json(protocol.resync_frame())
            return
        for frame in frames:
            await self._send_json(frame)
        last_id = frames[-1]["id"] if frames else since
        await self._send_json(protocol.synced_frame(last_id))

    async def disconnect(self, code: int) -> None:
        if self.inbox_reader is not None:
            # Frames that arrived before the close are still stored (and acknowledged into the
            # void): the client resends unacknowledged ones, and the resend is idempotent.
            self.inbox.put_nowait(_INBOX_CLOSED)
            await self.inbox_reader
        if self.room is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            await self.channel_layer.group_discard(self.user_group, self.channel_name)
        if self.access_recheck is not None:
            self.access_recheck.cancel()
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            await presence.presence_socket_close(
                user_id=self.scope["user"].pk, channel_name=self.channel_name
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.room is None or self.revoked:
            return
        self.inbox.put_nowait(text_data if text_data is not None else bytes_data)

    async def _read_inbox(self) -> None:
        """Runs for the socket's life: each client frame in arrival order, one at a time."""
        while (raw := await self.inbox.get()) is not _INBOX_CLOSED:
            try:
                await self._client_frame(raw)
            except Exception:
                # A bug must not cost the user the socket: closing would make the page reconnect
                # and resend the same frame, forever. Nothing was stored (the write is atomic).
                logger.exception("room socket frame failed")
                await self._send_json(
                    protocol.error_frame(protocol.ERROR_INTERNAL, "The server failed to handle this frame.")
                )

    async def _client_frame(self, raw: str | bytes | None) -> None:
        if self.revoked:  # queued before the access ended
            return
        try:
            request = protocol.parse_client_frame(raw)
        except protocol.ProtocolError as error:
            await self._send_json(error.frame())
            return
        if isinstance(request, protocol.AcknowledgeNotification):
            await self._acknowledge_notification(request)
            return
        user = self.scope["user"]
        if not await self._rate_limit_allows(user.pk):
            CHAT_RATE_LIMITED_FRAMES.inc()
            await self._send_json(
                protocol.error_frame(
                    protocol.ERROR_RATE_LIMITED,
                    "You are sending messages too fast; wait a moment.",
                    str(request.client_id),
                )
            )
            return
        try:
            result = await _message_create(
                room=self.room, author=user, text=request.text, client_id=request.client_id, broadcast=False
            )
        except services.MessageNotAllowed:
            # The write found the user's access revoked, perhaps before this socket heard of it;
            # nothing was stored. The check says which code; access back already is a race lost.
            await self._revoke(await self._access_close_code() or protocol.CLOSE_FORBIDDEN)
            return
        except Room.DoesNotExist:
            await self._revoke(protocol.CLOSE_ROOM_NOT_FOUND)
            return
        except (OperationalError, InterfaceError) as error:
            # PostgreSQL is down or restarting: nothing was stored, so nothing may be acknowledged.
            # The socket stays open and the page keeps the message pending for a retry.
            logger.error("cannot store a chat message, the database is unavailable: %s", type(error).__name__)
            await self._send_json(
                protocol.error_frame(
                    protocol.ERROR_UNAVAILABLE,
                    "The chat cannot store messages right now; your message was not sent. Retry shortly.",
                    str(request.client_id),
                )
            )
            return
        frame = protocol.message_frame(result.message)
        if len(self.acknowledged_ids) > 1000:  # copies the layer dropped never come
            self.acknowledged_ids.clear()
        self.acknowledged_ids.add(frame["id"])
        # Committed by now; sent from here rather than from the write's thread (services). A
        # resend is broadcast again too: its first try may have committed just as the connection
        # died, before anyone was told. Pages ignore an id they already have.
        try:
            await services.message_broadcast(result.message)
        except (redis.RedisError, OSError) as error:
            # Stored all the same, so the sender is told; the room's other pages fetch it when the
            # next message they receive shows the jump in seq (docs/protocol.md).
            logger.warning(
                "a stored message was not broadcast, Redis is unavailable: %s", type(error).__name__
            )
        await self._send_json(frame)

    async def _rate_limit_allows(self, user_id: int) -> bool:
        try:
            return await take_message_token(user_id)
        except (redis.RedisError, OSError) as error:
            # While Redis is down or restarting, storing people's messages matters more than
            # throttling them: PostgreSQL alone decides.
            logger.warning("message rate limit not checked, Redis is unavailable: %s", type(error).__name__)
            return True

    async def _acknowledge_notification(self, request: protocol.AcknowledgeNotification) -> None:
        notification_id = str(request.notification_id)
        if notification_id not in self.awaited_acks:
            return  # not pushed to this socket (another user's, made up) or acknowledged already
        self.awaited_acks.discard(notification_id)
        try:
            await _notification_acknowledge(
                notification_id=request.notification_id, user_id=self.scope["user"].pk
            )
        except (OperationalError, InterfaceError) as error:
            # Nothing to tell the page: its notification stays unacknowledged and is emailed.
            logger.warning(
                "cannot record a notification's acknowledgement, the database is unavailable: %s",
                type(error).__name__,
            )

    async def chat_message(self, event: dict[str, Any]) -> None:
        """Group event: a message stored by any process, forwarded to this socket as is."""
        if self.revoked:  # already in this process when the socket left its groups
            return
        if event["id"] in self.acknowledged_ids:
            self.acknowledged_ids.discard(event["id"])
            return
        await self.send(text_data=event["frame"])

    async def chat_notification(self, event: dict[str, Any]) -> None:
        """Group event: a notification for this socket's user (chat/notifications.py)."""
        if self.revoked:
            return
        if len(self.awaited_acks) >= _AWAITED_ACKS_MAX:
            self.awaited_acks.clear()
        self.awaited_acks.add(event["notification"]["id"])
        await self._send_json(event["notification"])

    async def chat_access_revoked(self, event: access.AccessRevokedEvent) -> None:
        """Group event (chat/access.py): this socket's access may have ended."""
        if self.revoked or event["room_id"] not in (None, self.room.pk):
            return
        if event["session"] is not None:
            # The session's row is deleted (committed): no check can find it valid again.
            if event["session"] == self.session_digest:
                await self._revoke(protocol.CLOSE_UNAUTHENTICATED)
            return
        code = await self._access_close_code()
        if code is not None:
            await self._revoke(code)

    async def _recheck_access_periodically(self) -> None:
        """Runs for the socket's life: finds the revocations no signal reports (chat/access.py)."""
        while not self.revoked:
            # Spread out, so that sockets which reconnected together do not check together.
            await asyncio.sleep(settings.CHAT_ACCESS_RECHECK_SECONDS * random.uniform(0.5, 1.5))
            code = await self._access_close_code()
            if code is not None:
                await self._revoke(code)

    async def _access_close_code(self) -> int | None:
        """The close code this socket's access now calls for, or None while it may stay."""
        try:
            await _room_access_check(self.session_key, self.scope["user"].pk, self.room.pk)
        except selectors.SessionEnded:
            return protocol.CLOSE_UNAUTHENTICATED
        except selectors.RoomNotFound:
            return protocol.CLOSE_ROOM_NOT_FOUND
        except selectors.RoomAccessDenied:
            return protocol.CLOSE_FORBIDDEN
        except (OperationalError, InterfaceError) as error:
            # Not knowing is no reason to close; the periodic check asks again.
            logger.warning(
                "cannot check a socket's access, the database is unavailable: %s", type(error).__name__
            )
        return None

    async def _revoke(self, code: int) -> None:
        """Close a socket whose access ended: leave its groups first, so nothing more reaches it."""
        if self.revoked:
            return
        self.revoked = True
        await self.channel_layer.group_discard(self.group, self.channel_name)
        await self.channel_layer.group_discard(self.user_group, self.channel_name)
        await self.close(code=code)

    async def _send_json(self, frame: Any) -> None:
        await self.send(text_data=json.dumps(frame))
