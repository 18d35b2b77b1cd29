"""Every page works under the Content-Security-Policy: no violation, and the room's socket still works."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from django.urls import reverse
from playwright.sync_api import BrowserContext, Page, expect

from deadletters.models import DeadLetter

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Violations as the page sees them (securitypolicyviolation events, from the first byte of each document).
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.effectiveDirective} blocked ${event.blockedURI || "inline"} `
    + `at ${event.sourceFile}:${event.lineNumber}`);
});
"""


def csp_watched_page(context: BrowserContext) -> tuple[Page, list[str]]:
    """A page that records every CSP violation: its events, and Chromium's console reports of them."""
    context.add_init_script(RECORD_VIOLATIONS)
    page = context.new_page()
    console: list[str] = []
    page.on(
        "console",
        lambda message: console.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return page, console


def violations(page: Page, console: list[str]) -> list[str]:
    return [*page.evaluate("window.__cspViolations"), *console]


def visit_each(page: Page, console: list[str], urls: list[str]) -> dict[str, list[str]]:
    found = {}
    for url in urls:
        response = page.goto(url)
        assert response is not None and response.status == 200, url
        assert "script-src 'self'" in response.headers["content-security-policy"], url
        page.wait_for_load_state("load")
        found[url] = violations(page, console)
        console.clear()
    return found


def test_every_page_loads_without_a_csp_violation(
    new_context: Callable[..., BrowserContext], make_user, make_room
):
    staff = make_user("boss", is_staff=True, is_superuser=True)
    room = make_room(f"csp-{uuid.uuid4().hex[:8]}", members=(staff,))
    letter = DeadLetter.objects.create(
        fingerprint="f" * 64, origin_queue="analytics", reason="rejected", task_name="analytics.count_events"
    )
    anonymous_page, anonymous_console = csp_watched_page(new_context())
    staff_page, staff_console = csp_watched_page(new_context(staff))

    found = {
        **visit_each(anonymous_page, anonymous_console, ["/accounts/login/", "/accounts/signup/"]),
        **visit_each(
            staff_page,
            staff_console,
            [
                "/",
                f"/rooms/{room.slug}/",
                reverse("analytics"),
                reverse("admin:index"),
                reverse("admin:deadletters_deadletter_changelist"),
                reverse("admin:deadletters_deadletter_change", args=[letter.pk]),
                reverse("admin:deadletters_broker_status"),
                reverse("admin:auth_user_change", args=[staff.pk]),
                reverse("admin:chat_room_add"),
            ],
        ),
    }

    assert {url: seen for url, seen in found.items() if seen} == {}


def test_the_room_page_sends_and_shows_a_message_under_the_policy(new_context, make_user, make_room):
    member = make_user("ann")
    room = make_room(f"csp-{uuid.uuid4().hex[:8]}", members=(member,))
    page, console = csp_watched_page(new_context(member))
    page.goto(f"/rooms/{room.slug}/")
    # The socket connected: connect-src 'self' covers the page's own ws: origin.
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")

    box = page.get_by_test_id("composer-input")
    box.fill("hello under the policy")
    box.press("Enter")

    stored = page.get_by_test_id("message-list").get_by_test_id("message").last
    expect(stored.get_by_test_id("message-text")).to_have_text("hello under the policy")
    expect(stored).to_have_attribute("data-state", "sent")  # the server stored and acknowledged it
    assert violations(page, console) == []
