"""Mention notifications from message to socket or email (chat/notifications.py), without the broker.

The broker's part (priorities, TTL, dead-lettering) is in tests/chat/test_notification_queue.py.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import timedelta

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import Group
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import presence, protocol, selectors, services
from chat.models import Message, NotificationDelivery
from chat.notifications import mention_notifications_deliver
from messaging.events import MENTION, PRIORITY_HIGH, PRIORITY_LOW, VIP_MENTION
from messaging.models import OutboxEvent
from tests.chat.test_consumer import connect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _user_ids_of_this_run(transactional_db) -> None:
    """User ids name Redis keys (presence, `user.<id>` groups); concurrent runs must not share them."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval('auth_user_id_seq', %s)", [random.randrange(10**6, 10**9)])


def send(author, room, text: str) -> Message:
    return services.message_create(room=room, author=author, text=text, client_id=uuid.uuid4()).message


def mention_events(message: Message) -> list[OutboxEvent]:
    events = OutboxEvent.objects.filter(
        routing_key__in=[MENTION.routing_key, VIP_MENTION.routing_key], payload__message_id=message.pk
    )
    return list(events.order_by("id"))


def make_vip(user) -> None:
    group, _ = Group.objects.get_or_create(name=selectors.VIP_GROUP)
    user.groups.add(group)


def test_each_mention_is_queued_in_the_message_transaction_with_an_expiry(make_user, make_room):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    room = make_room("general")
    before = timezone.now()
    with CaptureQueriesContext(connection) as queries:
        message = send(bob, room, "@alice @carol standup?")
    events = mention_events(message)
    assert [event.payload["user_id"] for event in events] == [alice.pk, carol.pk]
    # The room's lock is held meanwhile: all mentions in one INSERT, not one round trip each.
    mention_inserts = [
        q for q in queries if q["sql"].startswith(f'INSERT INTO "{OutboxEvent._meta.db_table}"')
    ]
    assert len(mention_inserts) == 1
    expires_at = timezone.datetime.fromisoformat(events[0].payload["expires_at"])
    assert expires_at >= before + timedelta(seconds=settings.NOTIFICATION_TTL_SECONDS)


def test_mentions_by_a_vip_are_queued_as_vip_mentions(make_user, make_room):
    _alice, bob = make_user("alice"), make_user("bob")
    make_vip(bob)
    message = send(bob, make_room("general"), "@alice now please")
    events = mention_events(message)
    assert [(event.routing_key, event.payload["priority"]) for event in events] == [
        (VIP_MENTION.routing_key, PRIORITY_HIGH)
    ]


def test_mentions_by_others_are_queued_as_normal_mentions(make_user, make_room):
    _alice, bob = make_user("alice"), make_user("bob")
    message = send(bob, make_room("general"), "@alice whenever")
    events = mention_events(message)
    assert [(event.routing_key, event.payload["priority"]) for event in events] == [
        (MENTION.routing_key, PRIORITY_LOW)
    ]


def test_message_frames_carry_the_vip_badge_without_a_query_per_message(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_vip(bob)
    room = make_room("general")
    for author in (alice, bob, alice, bob):
        send(author, room, "hi")
    with CaptureQueriesContext(connection) as queries:
        messages, _ = selectors.messages_page(room=room, limit=10)
        frames = [protocol.message_frame(m) for m in messages]
    assert [frame["vip"] for frame in frames] == [False, True, False, True]
    assert len(queries) == 1


async def test_notification_reaches_every_open_socket_of_the_mentioned_user(make_user, make_room):
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    general = await sync_to_async(make_room)("general")
    await sync_to_async(make_room)("random")
    in_general, _, _ = await connect(alice, "general")
    in_random, _, _ = await connect(alice, "random")
    message = await sync_to_async(send)(bob, general, "@alice see this")
    await in_general.receive_json_from(timeout=5)  # the message itself, in its room
    events = [event.payload for event in await sync_to_async(mention_events)(message)]

    await sync_to_async(mention_notifications_deliver)(events=events)

    expected = {
        "type": "notification",
        "id": events[0]["event_id"],
        "kind": "mention",
        "message_id": message.pk,
        "room": "general",
        "from": "bob",
        "text": "@alice see this",
    }
    assert await in_general.receive_json_from(timeout=5) == expected
    assert await in_random.receive_json_from(timeout=5) == expected
    assert mail.outbox == [], "a user with an open socket gets no email"
    delivery = await sync_to_async(NotificationDelivery.objects.get)()
    assert delivery.channel == NotificationDelivery.CHANNEL_SOCKET
    assert delivery.delivered_at is None, "pushed is not delivered: no page has acknowledged it yet"
    await in_general.disconnect()
    await in_random.disconnect()


def test_mentioned_user_without_an_open_socket_gets_an_email(make_user, make_room):
    make_user("alice", email="alice@example.com")
    bob = make_user("bob")
    message = send(bob, make_room("general"), "@alice you are offline")

    result = mention_notifications_deliver(events=[e.payload for e in mention_events(message)])

    assert result.delivered == 1
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
    assert "bob mentioned you in #general" in mail.outbox[0].subject
    assert "@alice you are offline" in mail.outbox[0].body
    assert NotificationDelivery.objects.get().channel == NotificationDelivery.CHANNEL_EMAIL


def test_mention_email_links_to_the_room_at_the_site_url(make_user, make_room, settings):
    settings.SITE_URL = "https://chat.example.com"
    make_user("alice", email="alice@example.com")
    message = send(make_user("bob"), make_room("general"), "@alice have a look")

    mention_notifications_deliver(events=[e.payload for e in mention_events(message)])

    assert "Open the room: https://chat.example.com/rooms/general/\n" in mail.outbox[0].body


def test_redelivered_notification_is_delivered_once(make_user, make_room):
    make_user("alice", email="alice@example.com")
    bob = make_user("bob")
    events = [e.payload for e in mention_events(send(bob, make_room("general"), "@alice once"))]

    first = mention_notifications_deliver(events=events)
    again = mention_notifications_deliver(events=events)

    assert (first.delivered, again.delivered, again.duplicates) == (1, 0, 1)
    assert len(mail.outbox) == 1
    assert NotificationDelivery.objects.count() == 1


def test_notification_past_its_expiry_is_dropped_not_delivered(make_user, make_room):
    make_user("alice", email="alice@example.com")
    bob = make_user("bob")
    events = [e.payload for e in mention_events(send(bob, make_room("general"), "@alice stale"))]
    events[0]["expires_at"] = (timezone.now() - timedelta(seconds=1)).isoformat()

    result = mention_notifications_deliver(events=events)

    assert result.expired == 1
    assert mail.outbox == []
    assert not NotificationDelivery.objects.exists()


def test_user_removed_from_the_private_room_is_not_notified(make_user, make_room):
    alice = make_user("alice", email="alice@example.com")
    bob = make_user("bob")
    room = make_room("secret", is_private=True, members=(alice, bob))
    events = [e.payload for e in mention_events(send(bob, room, "@alice secret"))]
    room.members.remove(alice)

    result = mention_notifications_deliver(events=events)

    assert result.skipped == 1
    assert mail.outbox == []


def test_presence_stops_counting_a_socket_whose_heartbeat_stopped(make_user):
    alice = make_user("alice")
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"{presence.key_prefix()}{alice.pk}"
    try:
        # A socket of a web process that crashed: its last heartbeat is older than the TTL.
        client.zadd(key, {"crashed-socket": time.time() - settings.PRESENCE_TTL_SECONDS - 1})
        assert presence.user_open_sockets(user_id=alice.pk) == 0
        client.zadd(key, {"live-socket": time.time()})
        assert presence.user_open_sockets(user_id=alice.pk) == 1
    finally:
        client.delete(key)
        client.close()


async def test_closing_the_socket_takes_the_user_offline(make_user, make_room):
    alice = await sync_to_async(make_user)("alice")
    await sync_to_async(make_room)("general")
    socket, _, _ = await connect(alice, "general")
    assert await sync_to_async(presence.user_open_sockets)(user_id=alice.pk) == 1
    await socket.disconnect()
    assert await sync_to_async(presence.user_open_sockets)(user_id=alice.pk) == 0
