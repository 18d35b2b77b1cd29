"""Mention notifications through the real RabbitMQ: priority order and the per-message TTL.

The relay's publishing function runs in this process (on this session's vhost); the notifier is
the Procfile's own `notifier` worker process.
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
from kombu import Connection

from chat import selectors, services
from chat.models import NotificationDelivery
from messaging.events import PRIORITY_HIGH, PRIORITY_LOW
from messaging.models import OutboxEvent
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.topology import DEAD_LETTER_QUEUE, declare_topology, notifications_queue
from tests.harness import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def notifications(broker_url) -> Iterator[Connection]:
    """A connection to this session's vhost with an empty notifications queue."""
    with Connection(broker_url) as conn:
        declare_topology(conn)
        notifications_queue(queue_type="classic").bind(conn.default_channel).purge()
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


def queue_depth(conn: Connection) -> int:
    return (
        notifications_queue(queue_type="classic")
        .bind(conn.channel())
        .queue_declare(passive=True)
        .message_count
    )


def test_vip_notifications_overtake_a_backlog_of_normal_ones(
    notifications, users, broker_url, start_notifier
):
    _alice, bob, vip, room = users
    for n in range(200):
        mention(bob, room, f"@alice normal {n}")
    for n in range(5):
        mention(vip, room, f"@alice vip {n}")
    publish_all(broker_url)
    assert queue_depth(notifications) == 205, "one task message per notification, all waiting"

    start_notifier()
    wait_until(
        lambda: NotificationDelivery.objects.count() == 205,
        timeout=180,
        message="205 notifications delivered",
    )

    order = list(NotificationDelivery.objects.order_by("id").values_list("priority", flat=True))
    vip_positions = [position for position, priority in enumerate(order) if priority == PRIORITY_HIGH]
    assert len(vip_positions) == 5
    assert max(vip_positions) < 10, f"VIP notifications delivered at positions {vip_positions} of 205"


def test_notification_published_twice_is_delivered_once(notifications, users, broker_url, start_notifier):
    _alice, bob, _vip, room = users
    mention(bob, room, "@alice once, even if the relay publishes it twice")
    publish_all(broker_url)
    # A relay that died after the broker's confirm and before marking the row sent publishes it again.
    OutboxEvent.objects.update(sent_at=None)
    publish_all(broker_url)
    assert queue_depth(notifications) == 2

    worker = start_notifier()
    # What the notifier reports for the copy is the behaviour: it recognised it as a duplicate.
    wait_until(lambda: "'duplicates': 1" in worker.log_text(), timeout=120, message="the copy handled")

    assert NotificationDelivery.objects.count() == 1
    assert "'delivered': 1" in worker.log_text()


def test_relay_never_mixes_priorities_in_one_task_message(notifications, users, broker_url, make_user):
    _alice, bob, vip, room = users
    make_user("carol")
    mention(bob, room, "@alice @carol lunch?")  # two events, one priority and expiry: one message
    mention(vip, room, "@alice now")
    publish_all(broker_url)

    received = []
    queue = notifications_queue(queue_type="classic").bind(notifications.default_channel)
    while (message := queue.get(no_ack=True)) is not None:
        args, _kwargs, _embed = json.loads(message.body)
        received.append((message.properties["priority"], len(args[0]), int(message.properties["expiration"])))

    assert [(priority, events) for priority, events, _ in received] == [(PRIORITY_HIGH, 1), (PRIORITY_LOW, 2)]
    assert all(0 < expiration <= settings.NOTIFICATION_TTL_SECONDS * 1000 for _, _, expiration in received)


def test_expired_notification_is_dead_lettered_with_reason_expired(notifications, users, broker_url):
    _alice, bob, _, room = users
    with override_settings(NOTIFICATION_TTL_SECONDS=1):
        mention(bob, room, "@alice this is only useful for a second")
    publish_all(broker_url)
    # No notifier runs: the message waits in the queue until its TTL runs out.

    dead = wait_until(
        lambda: _dead_letter_of(notifications, "chat.mention"), timeout=30, message="dead letter"
    )

    (death,) = [d for d in dead.headers["x-death"] if d["queue"] == "notifications"]
    assert death["reason"] == "expired"
    assert dead.delivery_info["routing_key"] == "chat.mention"
    assert not NotificationDelivery.objects.exists()


def _dead_letter_of(conn: Connection, routing_key: str):
    """The first message in `dead_letters` with this routing key, acked; the others stay queued."""
    channel = conn.channel()
    try:
        queue = DEAD_LETTER_QUEUE.bind(channel)
        while (message := queue.get(no_ack=False)) is not None:
            if message.delivery_info["routing_key"] == routing_key:
                message.ack()
                return message
        return None
    finally:
        channel.close()  # unacked messages of other tests go back to the queue
