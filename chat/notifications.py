"""Mention notifications: queued in the message's transaction, delivered once by a notifier.

Flow: `message_create` calls `mention_notifications_enqueue`, which writes one outbox event per
mentioned user, with an expiry time: a `chat.mention.vip` event when the author is VIP, else a
`chat.mention` one (messaging.events). The relay publishes each as a task message with a
per-message TTL; the topology's bindings put VIP mentions on the `notifications_vip` queue, which
a notifier process of its own drains (Procfile `notifier_vip`), and the rest on `notifications`
(Procfile `notifier`). So a backlog of normal mentions never stands in front of a VIP's, on
classic and quorum queues alike. Both notifiers' tasks (chat/tasks.py) call
`mention_notifications_deliver`; a notification that expires in its queue is dead-lettered by
RabbitMQ (reason "expired"), not delivered late.

What "once" means here. RabbitMQ delivers at least once (a notifier whose connection or, on a
cluster, whose RabbitMQ node is lost has its unacked messages delivered again), so every
notification id goes into a ledger (NotificationDelivery) whose unique index stops a redelivery:
a redelivery after the commit finds the row and does nothing; a concurrent one blocks on the index
until the first commits.

What "delivered" means. A user with an open socket gets a push, but a push reaches nobody when the
socket's web process died after the presence check (presence forgets a dead process's sockets only
after PRESENCE_TTL_SECONDS). So the push only records "pushed, awaiting acknowledgement" with a
deadline, and the page answers with a `notification_ack` frame (`notification_acknowledge`
records the delivery). Pushes that no page acknowledged by their deadline are emailed by
`notification_fallback_emails_send`, which a beat task runs every few seconds on the normal
notifier, so neither notifier ever waits for a page.

Order of effects and commits:
- A push happens after its row committed: a page's acknowledgement must find the row. A crash (or
  Redis failing) between the commit and the push loses the push, and the deadline's email covers it.
- An email is sent inside the transaction that records it, after the row is written (or locked,
  for a fallback) and before the commit: a failure rolls the row back and it is retried. The one
  window left is a crash between sending and the commit, which sends a second email: SMTP cannot
  take part in the transaction, and the other order (commit, then send) would lose the email in the
  same window instead. We choose a rare duplicate email over a lost one.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from chat import protocol
from chat.models import Message, NotificationDelivery
from chat.presence import user_open_sockets
from chat.selectors import user_can_read_room
from messaging.events import MENTION, MENTION_KIND, Mention, mention_event, mention_fields, mention_priority
from messaging.outbox import outbox_events_add

logger = logging.getLogger(__name__)

# The frame and the email carry the start of the message; the room has the rest.
NOTIFICATION_TEXT_CHARS = 300


@dataclass(frozen=True)
class DeliveryResult:
    delivered: int = 0  # newly emailed (or nothing could be sent: no address)
    pushed: int = 0  # newly pushed to open sockets, delivered once a page acknowledges it
    duplicates: int = 0  # already in the ledger: a redelivery
    expired: int = 0  # past their expiry on arrival: dropped, not delivered late
    skipped: int = 0  # message, user or access gone since the mention


@dataclass(frozen=True)
class FallbackResult:
    emailed: int = 0
    unsent: int = 0  # no address, the user or their access gone, or past the notification's expiry


# Fallback emails per sweep: the sweep takes a process of the normal notifier, so a batch that
# waits on SMTP for long holds up that process's mentions; the rest waits for the next sweep,
# seconds later.
FALLBACK_EMAILS_PER_SWEEP = 20


def mention_notifications_enqueue(
    *, message: Message, recipients: list[AbstractBaseUser], author_is_vip: bool
) -> None:
    """Inside the message's transaction: one outbox event per mentioned user, of the VIP event
    type when the author is VIP (its own queue and notifier)."""
    if not recipients:
        return
    queued_at = timezone.now()
    expires_at = queued_at + timedelta(seconds=settings.NOTIFICATION_TTL_SECONDS)
    priority = mention_priority(author_is_vip=author_is_vip)
    outbox_events_add(
        routing_key=mention_event(author_is_vip=author_is_vip).routing_key,
        payloads=[
            mention_fields(
                user_id=user.pk,
                message_id=message.pk,
                room_id=message.room_id,
                author_id=message.author_id,
                priority=priority,
                queued_at=queued_at,
                expires_at=expires_at,
            )
            for user in recipients
        ],
    )


def mention_notifications_deliver(*, events: Any) -> DeliveryResult:
    """Deliver one task message's mention events; safe to call again with the same events.

    Raises messaging.events.InvalidEvent (nothing delivered) when any event is malformed; lets
    database, Redis and SMTP errors propagate after rolling back that event's ledger row (retry).
    """
    parsed = MENTION.parse_batch(events)  # VIP_MENTION's payload is the same
    counts = {"delivered": 0, "pushed": 0, "duplicates": 0, "expired": 0, "skipped": 0}
    for event in parsed:
        counts[_deliver_one(event)] += 1
    return DeliveryResult(**counts)


def notification_acknowledge(*, notification_id: uuid.UUID, user_id: int) -> bool:
    """A page showed the user a pushed notification: record it delivered; False if nothing changed.

    Only the user's own notification, and only while it awaits an acknowledgement: one that was
    acknowledged already, or emailed because the deadline passed, stays as it is.
    """
    awaiting = NotificationDelivery.objects.filter(
        notification_id=notification_id,
        user_id=user_id,
        channel=NotificationDelivery.CHANNEL_SOCKET,
        delivered_at__isnull=True,
    )
    return awaiting.update(delivered_at=timezone.now()) == 1


def notification_fallback_emails_send(*, limit: int = FALLBACK_EMAILS_PER_SWEEP) -> FallbackResult:
    """Email up to `limit` pushes whose acknowledgement deadline passed; each once, whoever else runs.

    Each row is locked, re-checked and updated in its own transaction with its email, so an
    acknowledgement that lands first wins, a concurrent sweep skips it, and an SMTP failure rolls
    back only that row (raised; the next sweep tries it again).
    """
    now = timezone.now()
    due = list(
        NotificationDelivery.objects.filter(
            channel=NotificationDelivery.CHANNEL_SOCKET, delivered_at__isnull=True, ack_deadline__lte=now
        )
        .order_by("ack_deadline")
        .values_list("pk", flat=True)[:limit]
    )
    counts = {"emailed": 0, "unsent": 0}
    for pk in due:
        with transaction.atomic():
            row = (
                NotificationDelivery.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("user", "message__room", "message__author")
                .filter(pk=pk, channel=NotificationDelivery.CHANNEL_SOCKET, delivered_at__isnull=True)
                .first()
            )
            if row is None:  # acknowledged meanwhile, or another sweep has it
                continue
            user, message = row.user, row.message
            still_wanted = (
                user.is_active
                and user_can_read_room(user=user, room=message.room)
                and row.queued_at + timedelta(seconds=settings.NOTIFICATION_TTL_SECONDS) > now
            )
            if still_wanted and user.email:
                _send_email(
                    user=user,
                    frame=protocol.mention_notification_frame(
                        message, notification_id=row.notification_id, text_chars=NOTIFICATION_TEXT_CHARS
                    ),
                )
                row.channel = NotificationDelivery.CHANNEL_EMAIL
                counts["emailed"] += 1
            else:
                row.channel = NotificationDelivery.CHANNEL_NONE
                counts["unsent"] += 1
            row.delivered_at = timezone.now()
            row.save(update_fields=["channel", "delivered_at"])
    return FallbackResult(**counts)


def _deliver_one(event: Mention) -> str:
    now = timezone.now()
    if event.expires_at <= now:
        # RabbitMQ dead-letters what expires in the queue; this catches the rest (a retry, or a
        # message that expired on its way to the worker).
        logger.info("dropping expired notification %s", event.notification_id)
        return "expired"
    message = Message.objects.select_related("room", "author").filter(pk=event.message_id).first()
    user = get_user_model().objects.filter(pk=event.user_id, is_active=True).first()
    if message is None or user is None or not user_can_read_room(user=user, room=message.room):
        return "skipped"
    online = user_open_sockets(user_id=user.pk) > 0
    if online:
        channel = NotificationDelivery.CHANNEL_SOCKET
    elif user.email:
        channel = NotificationDelivery.CHANNEL_EMAIL
    else:
        channel = NotificationDelivery.CHANNEL_NONE
    with transaction.atomic():
        _, created = NotificationDelivery.objects.get_or_create(
            notification_id=event.notification_id,
            defaults={
                "user": user,
                "message": message,
                "kind": MENTION_KIND,
                "priority": event.priority,
                "channel": channel,
                "queued_at": event.queued_at,
                "delivered_at": None if online else now,
                "pushed_at": now if online else None,
                "ack_deadline": now + timedelta(seconds=settings.NOTIFICATION_ACK_SECONDS)
                if online
                else None,
            },
        )
        if not created:
            return "duplicates"
        frame = protocol.mention_notification_frame(
            message, notification_id=event.notification_id, text_chars=NOTIFICATION_TEXT_CHARS
        )
        if channel == NotificationDelivery.CHANNEL_EMAIL:
            # Before the commit, so a failure here rolls the ledger row back.
            _send_email(user=user, frame=frame)
    if channel == NotificationDelivery.CHANNEL_SOCKET:
        # After the commit, so that the page's acknowledgement finds the row.
        _push_to_sockets(user_id=user.pk, frame=frame)
        return "pushed"
    return "delivered"


def _push_to_sockets(*, user_id: int, frame: protocol.NotificationFrame) -> None:
    async_to_sync(get_channel_layer().group_send)(
        protocol.user_group(user_id), {"type": "chat.notification", "notification": frame}
    )


def _send_email(*, user: AbstractBaseUser, frame: protocol.NotificationFrame) -> None:
    send_mail(
        subject=f"{frame['from']} mentioned you in #{frame['room']}",
        message=(
            f"{frame['from']} mentioned you in #{frame['room']}:\n\n{frame['text']}\n\n"
            f"Open the room: {settings.SITE_URL}{reverse('room', kwargs={'slug': frame['room']})}\n"
        ),
        from_email=None,  # DEFAULT_FROM_EMAIL
        recipient_list=[user.email],
    )
