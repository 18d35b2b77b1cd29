"""Reads: who may see which room, and pages of its history."""

from __future__ import annotations

import time
from importlib import import_module

from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group
from django.core.exceptions import ValidationError
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils.crypto import constant_time_compare

from chat.models import Message, Room

# Members of this Django group (managed in the admin) are VIP: a badge in chat, and the
# notifications their messages cause jump the queue (chat/notifications.py).
VIP_GROUP = "VIP"


class RoomNotFound(Exception):
    pass


class RoomAccessDenied(Exception):
    pass


class SessionEnded(Exception):
    """The session behind an open socket is over, or its user may no longer log in."""


def rooms_for_user(*, user: AbstractBaseUser) -> QuerySet[Room]:
    """Public rooms plus the private rooms the user is a member of."""
    return Room.objects.filter(Q(is_private=False) | Q(members=user)).distinct()


def room_for_user(*, slug: str, user: AbstractBaseUser | AnonymousUser) -> Room:
    """The room a logged-in user may read; raises RoomNotFound or RoomAccessDenied."""
    try:
        room = Room.objects.get(slug=slug)
    except Room.DoesNotExist:
        raise RoomNotFound(slug) from None
    if not user_can_read_room(user=user, room=room):
        raise RoomAccessDenied(slug)
    return room


def user_can_read_room(*, user: AbstractBaseUser | AnonymousUser, room: Room) -> bool:
    if not user.is_authenticated:
        return False
    if not room.is_private:
        return True
    return room.members.filter(pk=user.pk).exists()


def room_access_check(*, session_key: str | None, user_id: int, room_id: int) -> Room:
    """Called while a socket is open, to learn whether it may stay: returns its room or raises.

    SessionEnded when its session no longer logs in `user_id` (session_user), RoomNotFound when
    the room is gone, RoomAccessDenied when the user may no longer read it (user_can_read_room).
    """
    user = session_user(session_key=session_key) if session_key else None
    if user is None or user.pk != user_id:
        raise SessionEnded(user_id)
    room = Room.objects.filter(pk=room_id).first()
    if room is None:
        raise RoomNotFound(room_id)
    if not user_can_read_room(user=user, room=room):
        raise RoomAccessDenied(room.slug)
    return room


def session_user(*, session_key: str) -> AbstractBaseUser | None:
    """The user a session logs in, or None once it does not: logged out, deleted or expired,
    the user deleted or inactive, or their password changed since (the session's auth hash).

    Django runs the same check on every request (django.contrib.auth.get_user); a socket
    outlives its request. Unlike get_user this only reads: get_user moves a session verified by
    an old key of SECRET_KEY_FALLBACKS to a new session key, which would log out the browser
    holding the old one.
    """
    data = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session_key).load()
    try:
        user_id = get_user_model()._meta.pk.to_python(data[SESSION_KEY])
        backend_path = data[BACKEND_SESSION_KEY]
        session_hash = data[HASH_SESSION_KEY]
    except (KeyError, ValidationError):
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = load_backend(backend_path).get_user(user_id)
    if user is None or not user.is_active:
        return None
    secrets = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]
    if not any(constant_time_compare(session_hash, user._get_session_auth_hash(secret=s)) for s in secrets):
        return None
    return user


def _vip_member(user_ref: OuterRef) -> Exists:
    return Exists(Group.objects.filter(name=VIP_GROUP, user=user_ref))


# Seconds a user's VIP status may be stale in this process: without the cache the check is a
# query per message, and a badge that follows an admin change a few seconds late costs nothing.
VIP_STATUS_TTL_SECONDS = 10.0
_vip_status: dict[int, tuple[float, bool]] = {}


def user_is_vip(*, user: AbstractBaseUser) -> bool:
    if not user.is_authenticated:
        return False
    now = time.monotonic()
    cached = _vip_status.get(user.pk)
    if cached is not None and cached[0] > now:
        return cached[1]
    is_vip = Group.objects.filter(name=VIP_GROUP, user=user).exists()
    _vip_status[user.pk] = (now + VIP_STATUS_TTL_SECONDS, is_vip)
    return is_vip


def _with_author_vip(messages: QuerySet[Message]) -> QuerySet[Message]:
    # One EXISTS per row in the same query, so a page of frames costs no query per message.
    return messages.annotate(author_is_vip=_vip_member(OuterRef("author_id")))


def _room_messages(room: Room) -> QuerySet[Message]:
    return _with_author_vip(Message.objects.filter(room=room).select_related("room", "author"))


def messages_page(
    *, room: Room, before: int | None = None, after: int | None = None, limit: int
) -> tuple[list[Message], bool]:
    """Up to `limit` messages oldest first, and whether more exist in the direction paged.

    With `after` the page starts right after that id (catching up forwards); otherwise it
    is the newest messages, older than `before` when given (scrolling back).
    """
    messages = _room_messages(room)
    if after is not None:
        page = list(messages.filter(id__gt=after).order_by("id")[: limit + 1])
        return page[:limit], len(page) > limit
    if before is not None:
        messages = messages.filter(id__lt=before)
    page = list(messages.order_by("-id")[: limit + 1])
    return list(reversed(page[:limit])), len(page) > limit


def message_by_client_id(*, author_id: int, client_id: object) -> Message | None:
    return (
        _with_author_vip(Message.objects.select_related("room", "author"))
        .filter(author_id=author_id, client_id=client_id)
        .first()
    )
