"""Writes: creating rooms and messages. Each runs in one transaction; effects leave on commit."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.utils.text import slugify

from chat import protocol
from chat.mentions import mention_recipients
from chat.metrics import CHAT_MESSAGES_STORED
from chat.models import Message, Room
from chat.notifications import mention_notifications_enqueue
from chat.selectors import message_by_client_id, user_can_read_room, user_is_vip
from messaging.events import (
    MESSAGE_CREATED,
    event_envelope,
    message_created_fields,
    message_created_insert_sql,
)
from messaging.models import OutboxEvent


class InvalidRoom(Exception):
    pass


class RoomExists(InvalidRoom):
    """The name's address belongs to a room the creator can see already: `room`."""

    def __init__(self, room: Room) -> None:
        super().__init__(f"A room with the address “{room.slug}” exists already.")
        self.room = room


class MessageNotAllowed(Exception):
    """The author may not post in the room (inactive, or not a member of a private room)."""


@dataclass(frozen=True)
class MessageResult:
    message: Message
    created: bool


SLUG_MAX_CHARS = Room._meta.get_field("slug").max_length
# Attempts at a numbered address before giving up; each failure means another creator took the
# address just chosen, so more than a few means something else is wrong.
_NUMBERED_SLUG_ATTEMPTS = 5


def room_create(*, creator: AbstractBaseUser, name: str, is_private: bool = False) -> Room:
    """Create a room named `name`; the creator is its first member.

    Raises RoomExists when the name's address is a room the creator can see, InvalidRoom for a
    name without letters or digits. When the address belongs to a private room the creator
    cannot see, the new room gets the first free numbered address (`name-2`, `name-3` ...)
    instead, exactly as when a visible room's address is free: that room's existence is not
    the creator's to know.
    """
    name = name.strip()
    slug = slugify(name)[:SLUG_MAX_CHARS]
    if not name or not slug:
        raise InvalidRoom("A room needs a name with at least one letter or digit.")
    room = _room_insert(creator=creator, slug=slug, name=name, is_private=is_private)
    if room is not None:
        return room
    taken = Room.objects.filter(slug=slug).first()
    if taken is not None and user_can_read_room(user=creator, room=taken):
        raise RoomExists(taken)
    # The unique constraint decides every race: a numbered address taken meanwhile is skipped.
    for _ in range(_NUMBERED_SLUG_ATTEMPTS):
        room = _room_insert(creator=creator, slug=_free_numbered_slug(slug), name=name, is_private=is_private)
        if room is not None:
            return room
    raise InvalidRoom("Could not find a free address for this room; try again.")


def _room_insert(*, creator: AbstractBaseUser, slug: str, name: str, is_private: bool) -> Room | None:
    """The new room, or None when `slug` is taken."""
    try:
        with transaction.atomic():
            room = Room.objects.create(slug=slug, name=name, is_private=is_private, created_by=creator)
            room.members.add(creator)
    except IntegrityError:
        return None
    return room


def _numbered_slug(slug: str, number: int) -> str:
    suffix = f"-{number}"
    return slug[: SLUG_MAX_CHARS - len(suffix)] + suffix


def _free_numbered_slug(slug: str) -> str:
    """`slug-2`, `slug-3` ...: the lowest numbered address no room has, whoever can see it."""
    # Every numbered form starts with this much of `slug` (suffixes up to 10 digits).
    stem = slug[: SLUG_MAX_CHARS - 11]
    taken = set(Room.objects.filter(slug__startswith=stem).values_list("slug", flat=True))
    number = 2
    while _numbered_slug(slug, number) in taken:
        number += 1
    return _numbered_slug(slug, number)


def room_member_remove(*, room: Room, user: AbstractBaseUser) -> None:
    """Take `user` out of `room`'s members; in a private room their open sockets there close.

    A public room is open to every logged-in user, members or not, so its sockets stay open.
    """
    with transaction.atomic():
        room.members.remove(user)
        # Side effect, on commit: chat.access tells the user's sockets to check their access
        # again (its m2m_changed receiver, which sees the admin's and a shell's removals too).


def user_deactivate(*, user: AbstractBaseUser) -> None:
    """Stop `user` from logging in; every socket they have open closes with 4401."""
    with transaction.atomic():
        user.is_active = False
        user.save(update_fields=["is_active"])
        # Side effect, on commit: chat.access tells the user's sockets to check their access
        # again (its post_save receiver, which sees the admin's and a shell's saves too).
        # message_create refuses the user's writes from the commit on.


def message_create(
    *, room: Room, author: AbstractBaseUser, text: str, client_id: uuid.UUID, broadcast: bool = True
) -> MessageResult:
    """Store a message, then (on commit) broadcast it to the room.

    Idempotent per (author, client_id): a resend returns the stored message and creates
    nothing. Raises MessageNotAllowed, storing nothing, when the author is inactive or not a
    member of a private room, and Room.DoesNotExist when the room is gone. The caller has
    validated `text` (chat.protocol). With `broadcast=False` the
    caller awaits `message_broadcast` itself once this has returned (committed): the room
    socket does, because it is on the event loop already, and a worker thread blocked in
    async_to_sync until that loop runs the send costs the thread pool more than the send.
    """
    # No lookup up front: the unique (author, client_id) constraint finds a resend, and a
    # query per message to catch the rare resend was half the write's CPU under load.
    # Reads first: the insert below holds the room's row lock until commit, and every round
    # trip inside that window makes the room's other writers wait.
    author_is_vip = user_is_vip(user=author)  # the frame's badge, and the notifications' queue
    recipients = mention_recipients(text=text, room=room, author=author)
    try:
        with transaction.atomic():
            message = _insert_message(room=room, author=author, text=text, client_id=client_id)
            message.author_is_vip = author_is_vip
            mention_notifications_enqueue(message=message, recipients=recipients, author_is_vip=author_is_vip)
            # Side effects, each only once the message is committed:
            # - live delivery to the room's sockets (at-most-once; clients repair gaps by seq);
            # - the outbox row written above is published to RabbitMQ by the relay;
            # - one outbox row per mentioned user becomes a notification task (chat/notifications.py),
            #   on the VIP notifications queue when the author is VIP;
            # - the chat_messages_stored_total metric counts it.
            if broadcast:
                transaction.on_commit(lambda: async_to_sync(message_broadcast)(message))
            transaction.on_commit(CHAT_MESSAGES_STORED.inc)
    except IntegrityError:
        # A resend (or a concurrent one that won the race): the stored message is the answer.
        # The rollback gave the room's seq number back.
        existing = message_by_client_id(author_id=author.pk, client_id=client_id)
        if existing is None:
            raise
        return MessageResult(existing, created=False)
    return MessageResult(message, created=True)


# One statement checks that the author may post (active, and a member when the room is private:
# the rule of chat.selectors.user_can_read_room), takes the room's seq number, inserts the message
# and its chat.message.created outbox event. A user whose access was revoked gets nothing stored,
# at no extra round trip, and the room's row lock (taken by the UPDATE) is held for one round trip
# and the commit (plus one for all of its mentions, chat/notifications.py). As three ORM
# statements, each round trip inside the lock also waited for the web process's GIL, and the
# room's other writers queued behind it: that was the loadtest's latency tail, and the ORM's save
# path a fifth of the process's CPU (docs/performance.md, step 13). created_at is PostgreSQL's
# clock, read once the lock is held, so it follows seq within a room whichever web process wrote
# the message. A rollback (a resend's unique violation included) still gives the seq number back.
_USER_TABLE = get_user_model()._meta.db_table
_MEMBER_TABLE = Room.members.through._meta.db_table
_MEMBER_ROOM_COLUMN = Room.members.field.m2m_column_name()
_MEMBER_USER_COLUMN = Room.members.field.m2m_reverse_name()
# The chat.message.created fields only this statement knows, from the message row it returns.
_EVENT_INSERT_FIELDS_SQL = message_created_insert_sql(
    message_id="id",
    seq="seq",
    created_at="""to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')""",
)
_MESSAGE_INSERT_SQL = f"""
WITH seq AS (
    UPDATE {Room._meta.db_table} AS room SET last_seq = last_seq + 1
    WHERE room.id = %(room_id)s
      AND EXISTS (SELECT 1 FROM {_USER_TABLE} AS author WHERE author.id = %(author_id)s AND author.is_active)
      AND (NOT room.is_private OR EXISTS (
          SELECT 1 FROM {_MEMBER_TABLE} AS member
          WHERE member.{_MEMBER_ROOM_COLUMN} = room.id AND member.{_MEMBER_USER_COLUMN} = %(author_id)s
      ))
    RETURNING last_seq
), message AS (
    INSERT INTO {Message._meta.db_table} (room_id, author_id, text, client_id, created_at, seq)
    SELECT %(room_id)s, %(author_id)s, %(text)s, %(client_id)s, clock_timestamp(), last_seq FROM seq
    RETURNING id, seq, created_at
), event AS (
    INSERT INTO {OutboxEvent._meta.db_table} (event_id, routing_key, payload, created_at)
    SELECT %(event_id)s, %(routing_key)s,
           %(payload)s::jsonb || {_EVENT_INSERT_FIELDS_SQL},
           created_at
    FROM message
)
SELECT id, seq, created_at FROM message
"""


def _insert_message(*, room: Room, author: AbstractBaseUser, text: str, client_id: uuid.UUID) -> Message:
    event_id = uuid.uuid4()
    # The statement adds the fields it knows (messaging.events.MessageCreatedInsertFields).
    payload = event_envelope(
        routing_key=MESSAGE_CREATED.routing_key,
        event_id=event_id,
        fields=message_created_fields(room_id=room.pk, room=room.slug, author_id=author.pk),
    )
    with connection.cursor() as cursor:
        cursor.execute(
            _MESSAGE_INSERT_SQL,
            {
                "room_id": room.pk,
                "author_id": author.pk,
                "text": text,
                "client_id": client_id,
                "event_id": event_id,
                "routing_key": MESSAGE_CREATED.routing_key,
                "payload": json.dumps(payload),
            },
        )
        row = cursor.fetchone()
    if row is None:
        # Rare (a revoked user, a deleted room), so the reason costs a query only then.
        if not Room.objects.filter(pk=room.pk).exists():
            raise Room.DoesNotExist(f"room {room.pk} no longer exists")
        raise MessageNotAllowed(f"user {author.pk} may not post in room {room.pk}")
    message_id, room.last_seq, created_at = row
    return Message(
        id=message_id,
        room=room,
        author=author,
        text=text,
        client_id=client_id,
        created_at=created_at,
        seq=room.last_seq,
    )


async def message_broadcast(message: Message) -> None:
    """Send a stored (committed) message to every socket in its room's group."""
    await get_channel_layer().group_send(
        protocol.room_group(message.room_id),
        # Serialised once here rather than once per receiving socket.
        {"type": "chat.message", "id": message.pk, "frame": json.dumps(protocol.message_frame(message))},
    )
