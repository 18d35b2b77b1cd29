"""The room page in a real browser: live delivery, safe rendering, reconnects, history, gaps."""

from __future__ import annotations

import uuid

import pytest
import redis
from django.conf import settings
from django.db import transaction
from django.db.models import F
from playwright.sync_api import Page, expect

from chat.models import Message, Room
from tests.e2e.conftest import off_loop, store_message

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

XSS_PAYLOAD = '<img src=x onerror="window.__xss=1;alert(1)"><script>window.__xss=2</script>'


@pytest.fixture
def room(make_room) -> Room:
    # A slug of its own: group names come from room ids, which repeat across the test
    # databases of concurrent runs sharing one Redis, and the page ignores other slugs.
    return make_room(f"general-{uuid.uuid4().hex[:8]}")


def messages(page: Page):
    return page.get_by_test_id("message-list").get_by_test_id("message")


def texts(page: Page):
    return messages(page).get_by_test_id("message-text")


def send(page: Page, text: str) -> None:
    box = page.get_by_test_id("composer-input")
    box.fill(text)
    box.press("Enter")


def connection_state(page: Page):
    return page.get_by_test_id("connection-state")


def store_without_broadcast(*, room: Room, author, text: str) -> Message:
    """A stored message whose live delivery was lost (group delivery is at-most-once)."""
    with transaction.atomic():
        Room.objects.filter(pk=room.pk).update(last_seq=F("last_seq") + 1)
        room.refresh_from_db()
        return Message.objects.create(
            room=room, author=author, text=text, client_id=uuid.uuid4(), seq=room.last_seq
        )


def seed_history(*, room: Room, author, count: int) -> None:
    Message.objects.bulk_create(
        Message(room=room, author=author, text=f"old message {seq}", client_id=uuid.uuid4(), seq=seq)
        for seq in range(1, count + 1)
    )
    Room.objects.filter(pk=room.pk).update(last_seq=count)


def test_message_sent_with_enter_appears_live_for_the_other_user(make_user, room, open_room):
    alice, bob = make_user("alice"), make_user("bob")
    alice_page, bob_page = open_room(alice, room.slug), open_room(bob, room.slug)

    send(alice_page, "hello bob")

    expect(texts(bob_page)).to_have_text(["hello bob"])
    expect(messages(bob_page).get_by_test_id("message-author")).to_have_text(["alice"])
    expect(messages(bob_page)).to_have_attribute("data-seq", "1")


def test_own_message_goes_from_pending_to_sent_on_ack(make_user, room, open_room):
    alice = make_user("alice")
    page = open_room(alice, room.slug)
    # Record every state change of the list's messages: the ack may come back before
    # any poll from here could see the pending state.
    page.evaluate(
        """() => {
            window.__transitions = [];
            const list = document.querySelector('[data-testid="message-list"]');
            new MutationObserver((records) => {
                for (const r of records) {
                    if (r.type === "childList") {
                        r.addedNodes.forEach((n) => n.dataset && n.dataset.testid === "message" &&
                            window.__transitions.push(
                                "added " + n.dataset.state + " " + n.querySelector(".status").textContent));
                    } else {
                        window.__transitions.push(r.oldValue + "->" + r.target.dataset.state);
                    }
                }
            }).observe(list, {childList: true, subtree: true, attributes: true, attributeOldValue: true,
                              attributeFilter: ["data-state"]});
        }"""
    )

    send(page, "am I through?")

    expect(messages(page)).to_have_attribute("data-state", "sent")
    assert page.evaluate("window.__transitions") == ["added pending sending…", "pending->sent"]
    stored = Message.objects.get(text="am I through?")
    expect(messages(page)).to_have_attribute("data-id", str(stored.id))
    expect(messages(page)).to_have_attribute("data-client-id", str(stored.client_id))


def test_html_in_a_message_is_shown_as_text_and_never_runs(make_user, room, open_room):
    alice, bob = make_user("alice"), make_user("bob")
    alice_page, bob_page = open_room(alice, room.slug), open_room(bob, room.slug)
    dialogs: list[str] = []
    bob_page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    send(alice_page, XSS_PAYLOAD)
    expect(messages(bob_page)).to_have_count(1)
    bob_page.reload()  # and once more as history from the API
    expect(messages(bob_page)).to_have_count(1)

    for page in (alice_page, bob_page):
        assert texts(page).first.text_content() == XSS_PAYLOAD
        assert (
            page.locator('[data-testid="message-list"] img, [data-testid="message-list"] script').count() == 0
        )
        assert page.evaluate("window.__xss") is None
    assert dialogs == []


def test_page_reconnects_after_server_restart_and_shows_missed_messages(
    make_user, room, open_room, live_daphne
):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    pages = [open_room(alice, room.slug), open_room(bob, room.slug)]

    live_daphne.stop()
    for page in pages:
        expect(connection_state(page)).to_have_attribute("data-state", "reconnecting")
        expect(connection_state(page)).to_contain_text("Reconnecting")
    store_message(room=room, author=carol, text="said while you were away")
    store_message(room=room, author=carol, text="and this too")
    live_daphne.start()

    for page in pages:
        expect(connection_state(page)).to_have_attribute("data-state", "connected")
        expect(texts(page)).to_have_text(["said while you were away", "and this too"])


def test_reconnect_attempts_back_off_while_the_server_stays_down(make_user, room, open_room, live_daphne):
    page = open_room(make_user("alice"), room.slug)

    live_daphne.stop()
    # "Retry now" is offered only for a wait over 2 s: with a fixed short delay it never shows,
    # with exponential backoff (0.5 s doubling) it does within a few failed attempts.
    expect(page.get_by_test_id("reconnect-now")).to_be_visible()
    live_daphne.start()

    expect(connection_state(page)).to_have_attribute("data-state", "connected")


def test_message_typed_while_server_is_down_is_sent_after_reconnect(make_user, room, open_room, live_daphne):
    alice, bob = make_user("alice"), make_user("bob")
    alice_page, bob_page = open_room(alice, room.slug), open_room(bob, room.slug)

    live_daphne.stop()
    expect(connection_state(alice_page)).to_have_attribute("data-state", "reconnecting")
    send(alice_page, "typed offline")
    expect(messages(alice_page)).to_have_attribute("data-state", "pending")
    live_daphne.start()

    expect(messages(alice_page)).to_have_attribute("data-state", "sent")
    expect(texts(alice_page)).to_have_text(
        ["typed offline"]
    )  # the replay and the resend's ack are one message
    expect(texts(bob_page)).to_have_text(["typed offline"])
    assert Message.objects.filter(text="typed offline").count() == 1


def test_seq_jump_makes_the_page_fetch_the_missing_messages(make_user, room, open_room):
    alice, bob = make_user("alice"), make_user("bob")
    page = open_room(alice, room.slug)

    store_without_broadcast(room=room, author=bob, text="lost in transit")
    store_message(room=room, author=bob, text="delivered live")

    expect(texts(page)).to_have_text(["lost in transit", "delivered live"])
    assert messages(page).evaluate_all("items => items.map(i => i.dataset.seq)") == ["1", "2"]


def test_scrolling_to_the_top_loads_older_history_until_the_beginning(make_user, room, open_room):
    alice = make_user("alice")
    seed_history(room=room, author=alice, count=120)
    page = open_room(alice, room.slug)
    expect(messages(page)).to_have_count(50)
    scroller = page.get_by_test_id("message-scroller")

    for shown in (100, 120):
        scroller.evaluate("el => { el.scrollTop = 0; }")
        expect(messages(page)).to_have_count(shown)

    expect(page.get_by_test_id("history-state")).to_have_attribute("data-state", "done")
    seqs = messages(page).evaluate_all("items => items.map(i => Number(i.dataset.seq))")
    assert seqs == list(range(1, 121))


def test_loading_older_history_keeps_the_reading_position(make_user, room, open_room):
    alice = make_user("alice")
    seed_history(room=room, author=alice, count=120)
    page = open_room(alice, room.slug)
    expect(messages(page)).to_have_count(50)
    scroller = page.get_by_test_id("message-scroller")

    scroller.evaluate("el => { el.scrollTop = 0; }")
    expect(messages(page)).to_have_count(100)

    # The message that was at the top (seq 71) is still on screen, not pushed far below
    # by the 50 rows inserted above it.
    offset = page.evaluate(
        """() => {
            const scroller = document.querySelector('[data-testid="message-scroller"]');
            const row = document.querySelector('[data-testid="message"][data-seq="71"]');
            return row.getBoundingClientRect().top - scroller.getBoundingClientRect().top;
        }"""
    )
    viewport = scroller.evaluate("el => el.clientHeight")
    assert 0 <= offset < viewport


def test_rate_limited_message_shows_polite_error_and_retry_sends_it(make_user, room, open_room, live_daphne):
    # A bucket of 3 that practically never refills: the 4th and 5th message are refused
    # however slowly the server works through the burst.
    live_daphne.extra_env.update(CHAT_RATE_BURST="3", CHAT_RATE_PER_SECOND="0.001")
    live_daphne.restart()
    alice = make_user("alice")
    page = open_room(alice, room.slug)
    burst = 5

    page.evaluate(
        """(count) => {
            const input = document.querySelector('[data-testid="composer-input"]');
            const form = document.querySelector('[data-testid="composer"]');
            for (let i = 0; i < count; i++) {
                input.value = "burst " + i;
                input.dispatchEvent(new Event("input"));
                form.requestSubmit();
            }
        }""",
        burst,
    )

    failed = page.locator('[data-testid="message"][data-state="failed"]')
    expect(failed.first).to_be_visible()
    expect(failed.first.get_by_test_id("message-error")).to_contain_text("too fast")
    # Once the limit has passed (here: the bucket is emptied), a retry goes through.
    client = redis.Redis.from_url(settings.REDIS_URL)
    buckets = list(client.scan_iter(f"{settings.REDIS_KEY_PREFIX}:ratelimit:*"))
    if buckets:
        client.delete(*buckets)
    client.close()
    retried_client_id = failed.first.get_attribute("data-client-id")
    failed.first.get_by_test_id("message-retry").click()
    expect(page.locator(f'[data-client-id="{retried_client_id}"]')).to_have_attribute("data-state", "sent")


def test_page_stops_reconnecting_and_says_why_when_the_room_is_gone(make_user, room, open_room, live_daphne):
    alice = make_user("alice")
    page = open_room(alice, room.slug)

    off_loop(room.delete)  # its access event is sent through async_to_sync
    live_daphne.restart()

    expect(connection_state(page)).to_have_attribute("data-state", "offline")
    expect(connection_state(page)).to_contain_text("does not exist")
    expect(page.get_by_test_id("composer-input")).to_be_disabled()


def test_page_reloads_history_when_too_much_was_missed_for_a_replay(make_user, room, open_room, live_daphne):
    alice, bob = make_user("alice"), make_user("bob")
    page = open_room(alice, room.slug)

    live_daphne.stop()
    expect(connection_state(page)).to_have_attribute("data-state", "reconnecting")
    missed = [f"missed {n}" for n in range(1, 6)]
    for text in missed:
        store_message(room=room, author=bob, text=text)
    # Fewer than were missed, so the server answers the reconnect with "resync".
    live_daphne.extra_env["CHAT_REPLAY_LIMIT"] = "2"
    live_daphne.start()

    expect(connection_state(page)).to_have_attribute("data-state", "connected")
    expect(texts(page)).to_have_text(missed)
