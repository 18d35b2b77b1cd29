"""A pushed mention counts as delivered only once a page acknowledges it; otherwise it is emailed.

The service and the socket run in this process; the last tests kill a real web process under a
real notifier and beat (chat/notifications.py says why a push alone proves nothing).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import mail
from django.db import connection
from kombu import Connection
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from bench.procfile import DaphneServer, procfile_argv
from chat import presence, services
from chat.models import Message, NotificationDelivery
from chat.notifications import (
    mention_notifications_deliver,
    notification_acknowledge,
    notification_fallback_emails_send,
)
from messaging.events import MENTION
from messaging.models import OutboxEvent
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.topology import NOTIFICATIONS_QUEUE_NAME, declare_topology
from tests.chat.test_consumer import connect, message, reply_to
from tests.conftest import session_cookie
from tests.harness import wait_until
from tests.mail import file_email_env, sent_emails

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _user_ids_of_this_run(transactional_db) -> None:
    """User ids name Redis keys (presence, `user.<id>` groups); concurrent runs must not share them."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval('auth_user_id_seq', %s)", [random.randrange(10**6, 10**9)])


@pytest.fixture
def people(make_user, make_room):
    room = make_room("general")
    return (
        make_user("alice", email="alice@example.com"),
        make_user("bob"),
        make_user("carol", email="carol@example.com"),
        room,
    )


@pytest.fixture
def online() -> Iterator:
    """Mark users as having an open socket, as a page's heartbeat would (chat/presence.py)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = []

    def mark(user) -> None:
        key = f"{presence.key_prefix()}{user.pk}"
        client.zadd(key, {f"socket-of-{user.pk}": time.time()})
        keys.append(key)

    yield mark
    if keys:
        client.delete(*keys)
    client.close()


def mention(author, room, text: str) -> Message:
    return services.message_create(room=room, author=author, text=text, client_id=uuid.uuid4()).message


def deliver_mentions_of(message: Message) -> None:
    events = OutboxEvent.objects.filter(routing_key=MENTION.routing_key, payload__message_id=message.pk)
    mention_notifications_deliver(events=[event.payload for event in events.order_by("id")])


def delivery_of(user) -> NotificationDelivery:
    return NotificationDelivery.objects.get(user=user)


# --- the service --------------------------------------------------------------------------------


def test_push_no_page_acknowledged_by_its_deadline_is_emailed_once(people, online, settings):
    alice, bob, _, room = people
    settings.NOTIFICATION_ACK_SECONDS = 0
    online(alice)
    deliver_mentions_of(mention(bob, room, "@alice are you there?"))
    assert mail.outbox == [], "online: pushed, not emailed"

    first = notification_fallback_emails_send()
    again = notification_fallback_emails_send()

    assert (first.emailed, again.emailed) == (1, 0)
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
    assert "@alice are you there?" in mail.outbox[0].body
    delivery = delivery_of(alice)
    assert delivery.channel == NotificationDelivery.CHANNEL_EMAIL
    assert delivery.pushed_at is not None and delivery.delivered_at is not None
    assert not notification_acknowledge(notification_id=delivery.notification_id, user_id=alice.pk), (
        "an acknowledgement after the email changes nothing"
    )


def test_acknowledged_push_is_delivered_and_never_emailed(people, online, settings):
    alice, bob, _, room = people
    settings.NOTIFICATION_ACK_SECONDS = 0
    online(alice)
    deliver_mentions_of(mention(bob, room, "@alice seen it?"))

    assert notification_acknowledge(notification_id=delivery_of(alice).notification_id, user_id=alice.pk)
    result = notification_fallback_emails_send()

    assert result.emailed == 0 and mail.outbox == []
    delivery = delivery_of(alice)
    assert delivery.channel == NotificationDelivery.CHANNEL_SOCKET and delivery.delivered_at is not None


def test_push_within_its_deadline_is_not_emailed_yet(people, online, settings):
    alice, bob, _, room = people
    settings.NOTIFICATION_ACK_SECONDS = 600
    online(alice)
    deliver_mentions_of(mention(bob, room, "@alice whenever you are back"))

    assert notification_fallback_emails_send().emailed == 0
    assert mail.outbox == [] and delivery_of(alice).delivered_at is None


def test_another_users_acknowledgement_changes_nothing(people, online):
    alice, bob, _, room = people
    online(alice)
    deliver_mentions_of(mention(bob, room, "@alice only yours"))

    assert not notification_acknowledge(notification_id=delivery_of(alice).notification_id, user_id=bob.pk)
    assert delivery_of(alice).delivered_at is None


def test_fallback_sends_nothing_to_a_user_who_lost_access_meanwhile(people, online, settings, make_room):
    alice, bob, _, _ = people
    settings.NOTIFICATION_ACK_SECONDS = 0
    secret = make_room("secret", is_private=True, members=(alice, bob))
    online(alice)
    deliver_mentions_of(mention(bob, secret, "@alice a secret"))
    secret.members.remove(alice)

    result = notification_fallback_emails_send()

    assert (result.emailed, result.unsent) == (0, 1)
    assert mail.outbox == []
    assert delivery_of(alice).channel == NotificationDelivery.CHANNEL_NONE


# --- the socket ---------------------------------------------------------------------------------


async def next_notification(communicator) -> dict:
    while (frame := await communicator.receive_json_from(timeout=5))["type"] != "notification":
        pass
    return frame


async def test_the_socket_records_its_pages_acknowledgement(people):
    alice, bob, _, room = people
    socket, _, _ = await connect(alice)
    await sync_to_async(deliver_mentions_of)(await sync_to_async(mention)(bob, room, "@alice look"))
    notification = await next_notification(socket)

    await socket.send_json_to({"type": "notification_ack", "id": notification["id"]})
    # Frames are handled in order: once the next one is answered, the acknowledgement was handled.
    sent = message("next")
    await socket.send_json_to(sent)
    await reply_to(socket, sent["client_id"])

    delivery = await sync_to_async(delivery_of)(alice)
    assert str(delivery.notification_id) == notification["id"]
    assert delivery.channel == NotificationDelivery.CHANNEL_SOCKET and delivery.delivered_at is not None
    await socket.disconnect()


async def test_a_socket_ignores_acknowledgements_of_notifications_not_pushed_to_it(people):
    alice, bob, carol, room = people
    alices, _, _ = await connect(alice)
    carols, _, _ = await connect(carol)
    await sync_to_async(deliver_mentions_of)(await sync_to_async(mention)(bob, room, "@alice for you only"))
    notification = await next_notification(alices)

    await carols.send_json_to({"type": "notification_ack", "id": notification["id"]})
    sent = message("next")
    await carols.send_json_to(sent)
    await reply_to(carols, sent["client_id"])

    assert (await sync_to_async(delivery_of)(alice)).delivered_at is None
    await alices.disconnect()
    await carols.disconnect()


# --- real processes: a web process killed after the push -----------------------------------------


@pytest.fixture
def notifier_and_beat(broker_url, processes, start_notifier, tmp_path) -> Path:
    """The Procfile's notifier and beat, with a 2 s acknowledgement deadline; returns the mail directory."""
    with Connection(broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(NOTIFICATIONS_QUEUE_NAME)
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    start_notifier(**file_email_env(mail_dir), NOTIFICATION_ACK_SECONDS="2")
    processes.start(
        procfile_argv("beat"),
        # Its schedule file in this test's directory; the alert check is not this test's business.
        env={
            "BEAT_SCHEDULE_FILENAME": str(tmp_path / "beat-schedule"),
            "NOTIFICATION_ACK_SWEEP_SECONDS": "1",
            "ALERT_CHECK_SECONDS": "3600",
        },
    )
    return mail_dir


def publish_all(broker_url: str) -> None:
    publisher = EventPublisher(broker_url)
    try:
        while publish_pending_events(publisher=publisher).selected:
            pass
    finally:
        publisher.close()


def open_socket(server: DaphneServer, user) -> ClientConnection:
    return ws_connect(
        f"{server.ws_url}/ws/rooms/general/",
        origin=f"http://127.0.0.1:{server.port}",
        additional_headers={"Cookie": f"sessionid={session_cookie(user)}"},
    )


def receive_notification(socket: ClientConnection) -> dict:
    while (frame := json.loads(socket.recv(timeout=30)))["type"] != "notification":
        pass
    return frame


def emailed(user) -> bool:
    return delivery_of(user).channel == NotificationDelivery.CHANNEL_EMAIL


def emails_to(mail_dir: Path, address: str) -> list:
    return [m for m in sent_emails(mail_dir) if m["To"] == address]


def test_push_to_a_killed_web_process_is_emailed_not_recorded_delivered(
    live_daphne, notifier_and_beat, people, broker_url
):
    alice, bob, _, room = people
    with open_socket(live_daphne, alice) as socket:
        mention(bob, room, "@alice are you still there?")
        publish_all(broker_url)
        receive_notification(socket)

        # The page's web process dies before the page could acknowledge (SIGKILL: no goodbye).
        live_daphne.kill()

    # The email is sent before its ledger row commits: wait for the commit, then read the mail.
    wait_until(lambda: emailed(alice), timeout=60, message="the fallback email recorded")
    (email,) = emails_to(notifier_and_beat, "alice@example.com")
    assert email["Subject"].endswith("bob mentioned you in #general")
    assert delivery_of(alice).pushed_at is not None, (
        "pushed, then emailed: never counted delivered by the push"
    )


def test_acknowledged_push_is_recorded_delivered_and_not_emailed(
    live_daphne, notifier_and_beat, people, broker_url
):
    alice, bob, carol, room = people
    with open_socket(live_daphne, alice) as alices, open_socket(live_daphne, carol) as carols:
        mention(bob, room, "@alice @carol standup?")
        publish_all(broker_url)
        alices.send(json.dumps({"type": "notification_ack", "id": receive_notification(alices)["id"]}))
        receive_notification(carols)  # and never acknowledged

        wait_until(
            lambda: delivery_of(alice).delivered_at, timeout=30, message="alice's acknowledgement recorded"
        )
        # Pushed after alice's, so due after it: once carol's email is recorded, alice's was swept too.
        wait_until(lambda: emailed(carol), timeout=60, message="carol's email recorded")
    assert len(emails_to(notifier_and_beat, "carol@example.com")) == 1
    assert emails_to(notifier_and_beat, "alice@example.com") == []
    assert delivery_of(alice).channel == NotificationDelivery.CHANNEL_SOCKET
