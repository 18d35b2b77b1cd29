"""Mention notifications through the real RabbitMQ: VIP mentions on a queue and notifier of their
own, and the per-message TTL.

The relay's publishing function runs in this process (on this session's vhost); the notifiers are
the Procfile's own `notifier` and `notifier_vip` worker processes.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.contrib.auth.models import Group
from django.db import connection
from django.test import override_settings
from kombu import Connection, Queue

from chat import selectors, services
from chat.models import NotificationDelivery
from messaging.events import MENTION, PRIORITY_HIGH, VIP_MENTION
from messaging.models import OutboxEvent
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.topology import (
    CHAT_EVENTS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
    WORK_QUEUE_ARGUMENTS,
    declare_topology,
)
from tests.harness import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

NOTIFICATION_QUEUES = (NOTIFICATIONS_QUEUE_NAME, VIP_NOTIFICATIONS_QUEUE_NAME)


@pytest.fixture
def notifications(broker_url) -> Iterator[Connection]:
    """A connection to this session's vhost with both notifications queues empty."""
    with Connection(broker_url) as conn:
        declare_topology(conn)
        for queue in NOTIFICATION_QUEUES:
            conn.default_channel.queue_purge(queue)
        yield conn


@pytest.fixture
def users(make_user, make_room):
    # User ids name Redis presence keys; keep them apart from concurrent runs' users.
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval('auth_user_id_seq', %s)", [random.randrange(10**6, 10**9)])
    alice = make_user("alice", email="alice@example.com")
    bob, vip = make_user("bob"), make_user("vip")
    group, _ = Group.objects.get_or_create(name=selectors.VIP_GROUP)
    vip.groups.add(group)
    return alice, bob, vip, make_room("general")


def mention(author, room, text: str) -> None:
    services.message_create(room=room, author=author, text=text, client_id=uuid.uuid4())


def publish_all(broker_url: str) -> None:
    publisher = EventPublisher(broker_url)
    try:
        while publish_pending_events(publisher=publisher).selected:
            pass
    finally:
        publisher.close()


def queue_depth(conn: Connection, queue: str) -> int:
    channel = conn.channel()
    try:
        return channel.queue_declare(queue, passive=True).message_count
    finally:
        channel.close()


def drain(conn: Connection, queue: str) -> list[tuple[str, str, list[dict], dict]]:
    """Every message in `queue`, acked: (routing key, task name, events, properties)."""
    received = []
    channel = conn.channel()
    try:
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            args, _kwargs, _embed = json.loads(message.body)
            received.append(
                (message.delivery_info["routing_key"], message.headers["task"], args[0], message.properties)
            )
    finally:
        channel.close()
    return received


@pytest.mark.parametrize("queue", NOTIFICATION_QUEUES)
def test_each_notifications_queue_is_a_work_queue_without_priorities(notifications, queue):
    # Redeclaring succeeds only when the broker's queue has exactly these arguments: the
    # dead-letter exchange and no x-max-priority (BROKER_QUEUE_TYPE is classic in this session).
    Queue(queue, exchange=CHAT_EVENTS_EXCHANGE, durable=True, queue_arguments=WORK_QUEUE_ARGUMENTS).bind(
        notifications.default_channel
    ).queue_declare()


def test_vip_mentions_reach_the_vip_queue_and_the_others_the_normal_one(notifications, users, broker_url):
    _alice, bob, vip, room = users
    mention(bob, room, "@alice normal")
    mention(vip, room, "@alice from a VIP")
    mention(bob, room, "@alice normal again")
    publish_all(broker_url)

    normal = drain(notifications, NOTIFICATIONS_QUEUE_NAME)
    vips = drain(notifications, VIP_NOTIFICATIONS_QUEUE_NAME)

    assert [(key, task, len(events)) for key, task, events, _ in normal] == [
        (MENTION.routing_key, MENTION.task_name, 1),
        (MENTION.routing_key, MENTION.task_name, 1),
    ]
    assert [(key, task, events[0]["author_id"]) for key, task, events, _ in vips] == [
        (VIP_MENTION.routing_key, VIP_MENTION.task_name, vip.pk)
    ]
    assert vips[0][2][0]["priority"] == PRIORITY_HIGH  # what the ledger will record
    assert all("priority" not in properties for *_, properties in normal + vips)


def test_relay_never_puts_a_vip_mention_in_a_normal_message(notifications, users, broker_url, make_user):
    _alice, bob, vip, room = users
    make_user("carol")
    mention(bob, room, "@alice @carol lunch?")  # two events, one routing key and expiry: one message
    mention(vip, room, "@alice now")
    publish_all(broker_url)

    normal = drain(notifications, NOTIFICATIONS_QUEUE_NAME)
    vips = drain(notifications, VIP_NOTIFICATIONS_QUEUE_NAME)

    assert [len(events) for _, _, events, _ in normal] == [2]
    assert [len(events) for _, _, events, _ in vips] == [1]
    for *_, properties in normal + vips:
        assert 0 < int(properties["expiration"]) <= settings.NOTIFICATION_TTL_SECONDS * 1000


def test_vip_mention_is_delivered_by_the_vip_notifier_while_the_normal_notifier_is_stopped(
    notifications, users, broker_url, start_vip_notifier
):
    alice, bob, vip, room = users
    for n in range(50):
        mention(bob, room, f"@alice normal {n}")
    mention(vip, room, "@alice from a VIP")
    publish_all(broker_url)

    start_vip_notifier()  # the normal notifier is not running
    (delivery,) = wait_until(
        lambda: list(NotificationDelivery.objects.all()), timeout=60, message="the VIP mention delivered"
    )

    assert (delivery.user_id, delivery.message.author_id) == (alice.pk, vip.pk)
    assert delivery.priority == PRIORITY_HIGH
    assert queue_depth(notifications, NOTIFICATIONS_QUEUE_NAME) == 50
    assert queue_depth(notifications, VIP_NOTIFICATIONS_QUEUE_NAME) == 0


def test_notification_published_twice_is_delivered_once(notifications, users, broker_url, start_notifier):
    _alice, bob, _vip, room = users
    mention(bob, room, "@alice once, even if the relay publishes it twice")
    publish_all(broker_url)
    # A relay that died after the broker's confirm and before marking the row sent publishes it again.
    OutboxEvent.objects.update(sent_at=None)
    publish_all(broker_url)
    assert queue_depth(notifications, NOTIFICATIONS_QUEUE_NAME) == 2

    worker = start_notifier()
    # What the notifier reports for the copy is the behaviour: it recognised it as a duplicate.
    wait_until(lambda: "'duplicates': 1" in worker.log_text(), timeout=120, message="the copy handled")

    assert NotificationDelivery.objects.count() == 1
    assert "'delivered': 1" in worker.log_text()


@pytest.mark.parametrize(
    ("author", "queue"), [("bob", NOTIFICATIONS_QUEUE_NAME), ("vip", VIP_NOTIFICATIONS_QUEUE_NAME)]
)
def test_expired_notification_is_dead_lettered_with_reason_expired(
    notifications, users, broker_url, author, queue
):
    _alice, bob, vip, room = users
    with override_settings(NOTIFICATION_TTL_SECONDS=1):
        mention({"bob": bob, "vip": vip}[author], room, "@alice this is only useful for a second")
    publish_all(broker_url)
    # No notifier runs: the message waits in the queue until its TTL runs out.

    dead = wait_until(lambda: _dead_letter_from(notifications, queue), timeout=30, message="dead letter")

    (death,) = [d for d in dead.headers["x-death"] if d["queue"] == queue]
    assert death["reason"] == "expired"
    assert not NotificationDelivery.objects.exists()


def _dead_letter_from(conn: Connection, queue: str):
    """The first message in `dead_letters` that died in `queue`, acked; the others stay queued."""
    channel = conn.channel()
    try:
        dead_letters = DEAD_LETTER_QUEUE.bind(channel)
        while (message := dead_letters.get(no_ack=False)) is not None:
            if any(death["queue"] == queue for death in message.headers.get("x-death", [])):
                message.ack()
                return message
        return None
    finally:
        channel.close()  # unacked messages of other tests go back to the queue
