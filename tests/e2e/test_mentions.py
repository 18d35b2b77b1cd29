"""Mentions in the browser, through the whole pipeline: outbox -> relay -> RabbitMQ -> notifier -> socket."""

from __future__ import annotations

import random

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from kombu import Connection
from playwright.sync_api import expect

from chat import selectors
from chat.models import NotificationDelivery
from messaging.topology import NOTIFICATIONS_QUEUE_NAME, declare_topology
from tests.e2e.conftest import store_message
from tests.harness import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def pipeline(broker_url, relay_process, start_notifier) -> None:
    """The relay and the Procfile's notifier worker, on this session's vhost."""
    with Connection(broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(NOTIFICATIONS_QUEUE_NAME)
    start_notifier()


@pytest.fixture
def alice_bob(make_user, make_room):
    # User ids name Redis presence keys and `user.<id>` groups; keep them apart from other runs.
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval('auth_user_id_seq', %s)", [random.randrange(10**6, 10**9)])
    general, other = make_room("general"), make_room("random")
    return make_user("alice"), make_user("bob"), general, other


def test_mention_in_another_room_shows_a_toast_and_an_unread_count(pipeline, alice_bob, open_room):
    alice, bob, _general, other = alice_bob
    page = open_room(alice, "general")

    store_message(room=other, author=bob, text="@alice can you look at this?")

    toast = page.get_by_test_id("notification-toast")
    expect(toast).to_contain_text("bob mentioned you in #random")
    expect(toast).to_contain_text("@alice can you look at this?")
    unread = page.locator('[data-testid="unread-room"][data-room="random"]')
    expect(unread.get_by_test_id("unread-count")).to_have_text("1")


def test_the_page_acknowledges_a_mention_it_shows(pipeline, alice_bob, open_room):
    alice, bob, _general, other = alice_bob
    page = open_room(alice, "general")

    store_message(room=other, author=bob, text="@alice did you see this?")

    expect(page.get_by_test_id("notification-toast")).to_contain_text("bob mentioned you in #random")
    # Only the page's acknowledgement makes the push count as delivered (no email follows).
    delivery = wait_until(
        lambda: NotificationDelivery.objects.filter(user=alice, delivered_at__isnull=False).first(),
        timeout=30,
        message="the page's acknowledgement recorded",
    )
    assert delivery.channel == NotificationDelivery.CHANNEL_SOCKET


def test_mention_in_the_open_room_is_highlighted_and_not_counted_unread(pipeline, alice_bob, open_room):
    alice, bob, general, _other = alice_bob
    page = open_room(alice, "general")

    store_message(room=general, author=bob, text="thanks @alice and @carol")

    message = page.get_by_test_id("message-list").get_by_test_id("message")
    expect(message.get_by_test_id("mention-me")).to_have_text("@alice")
    expect(message.get_by_test_id("mention")).to_have_text("@carol")
    expect(message.get_by_test_id("message-text")).to_have_text("thanks @alice and @carol")
    expect(page.get_by_test_id("notification-toast")).to_contain_text("bob mentioned you in #general")
    expect(page.get_by_test_id("unread-room")).to_have_count(0)


def test_messages_of_a_vip_show_a_badge(alice_bob, open_room):
    alice, bob, general, _other = alice_bob
    group, _ = Group.objects.get_or_create(name=selectors.VIP_GROUP)
    bob.groups.add(group)
    page = open_room(alice, "general")

    store_message(room=general, author=bob, text="from a VIP")
    store_message(room=general, author=alice, text="from a regular")

    messages = page.get_by_test_id("message-list").get_by_test_id("message")
    expect(messages).to_have_count(2)
    expect(messages.nth(0).get_by_test_id("vip-badge")).to_have_text("VIP")
    expect(messages.nth(1).get_by_test_id("vip-badge")).to_have_count(0)
