"""Revoked access reaching open room sockets: the `chat.access_revoked` channel-layer event.

Access to a room ends through services (chat.services.room_member_remove, user_deactivate), but
also through the admin, a shell, `clearsessions`, a logout or a password change. The receivers
here see every one of those that goes through the ORM and only publish, once the change is
committed, an event to the sockets it may concern. Each socket then checks its access again
(chat.selectors.room_access_check) and closes with 4401 or 4403
(chat.consumers.RoomConsumer.chat_access_revoked). What no signal reports (a queryset update(),
raw SQL, a session that expires) the sockets find at their periodic check
(CHAT_ACCESS_RECHECK_SECONDS).
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from typing import Any, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import SESSION_KEY, get_user_model
from django.contrib.sessions.models import Session
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver
from redis import RedisError

from chat import protocol
from chat.models import Room

logger = logging.getLogger(__name__)

EVENT_ACCESS_REVOKED = "chat.access_revoked"


class AccessRevokedEvent(TypedDict):
    type: str
    # Only the sockets of this room; None: the sockets of every room.
    room_id: int | None
    # session_digest() of a session that ended (its sockets close without a check); None: check.
    session: str | None


def session_digest(session_key: str) -> str:
    """How events name a session, so that session keys never travel through Redis."""
    return hashlib.sha256(session_key.encode()).hexdigest()


def access_revoked_publish(*, group: str, room_id: int | None = None, session_key: str | None = None) -> None:
    """Tell the sockets in `group` to check their access, once the current transaction commits."""
    event: AccessRevokedEvent = {
        "type": EVENT_ACCESS_REVOKED,
        "room_id": room_id,
        "session": session_digest(session_key) if session_key is not None else None,
    }
    transaction.on_commit(partial(_group_send, group, event))


def _group_send(group: str, event: AccessRevokedEvent) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(group, event)
    except (RedisError, OSError) as error:
        # The change itself is committed; failing the admin's request would not undo it.
        logger.warning(
            "cannot tell open sockets that access was revoked, Redis is unavailable (%s); "
            "they find out at their periodic check",
            type(error).__name__,
        )


@receiver(m2m_changed, sender=Room.members.through, dispatch_uid="chat.access.members")
def _members_removed(
    sender: Any, instance: Any, action: str, reverse: bool, pk_set: set[int] | None, **kwargs: Any
) -> None:
    if action == "post_remove" and not reverse:  # room.members.remove(...), or set() in the admin
        for user_id in pk_set or ():
            access_revoked_publish(group=protocol.user_group(user_id), room_id=instance.pk)
    elif action == "post_clear" and not reverse:  # room.members.clear(): the ids are gone already
        access_revoked_publish(group=protocol.room_group(instance.pk), room_id=instance.pk)
    elif action in ("post_remove", "post_clear"):  # user.rooms.remove(...) or clear()
        access_revoked_publish(group=protocol.user_group(instance.pk))


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="chat.access.user_saved")
def _user_saved(sender: Any, instance: Any, created: bool, update_fields: Any, **kwargs: Any) -> None:
    # Deactivated, or a new password (every session's auth hash changes). A login's last_login
    # stamp is the one frequent save, and it never takes access away.
    if created or (update_fields is not None and set(update_fields) == {"last_login"}):
        return
    access_revoked_publish(group=protocol.user_group(instance.pk))


@receiver(post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="chat.access.user_deleted")
def _user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    access_revoked_publish(group=protocol.user_group(instance.pk))


@receiver(post_save, sender=Room, dispatch_uid="chat.access.room_saved")
def _room_saved(sender: Any, instance: Room, created: bool, **kwargs: Any) -> None:
    if not created:  # perhaps made private
        access_revoked_publish(group=protocol.room_group(instance.pk), room_id=instance.pk)


@receiver(post_delete, sender=Room, dispatch_uid="chat.access.room_deleted")
def _room_deleted(sender: Any, instance: Room, **kwargs: Any) -> None:
    access_revoked_publish(group=protocol.room_group(instance.pk), room_id=instance.pk)


# A logout (its flush), a password change on its own session (a new key), the admin and
# `clearsessions` all delete the row through the ORM. With this receiver connected, a queryset's
# delete() also loads the rows and sends one signal each (Django skips the fast delete).
@receiver(post_delete, sender=Session, dispatch_uid="chat.access.session_deleted")
def _session_deleted(sender: Any, instance: Session, **kwargs: Any) -> None:
    user_id = instance.get_decoded().get(SESSION_KEY)
    if user_id is None:  # not logged in: no socket of it was accepted
        return
    user_pk = get_user_model()._meta.pk.to_python(user_id)
    access_revoked_publish(group=protocol.user_group(user_pk), session_key=instance.session_key)
