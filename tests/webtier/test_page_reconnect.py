"""The room page in Chromium behind the load balancer: a web process's restart (1012) is a reconnect
at once to another process, with nothing lost and no error shown."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import session_cookie
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, EXPECT_TIMEOUT_MS, store_message

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Every state and text the connection indicator shows, recorded in the page as it changes.
RECORD_CONNECTION_STATES = """() => {
    window.__connection = [];
    const indicator = document.querySelector('[data-testid="connection-state"]');
    const record = () =>
        window.__connection.push(indicator.dataset.state + ": " + indicator.textContent.trim());
    new MutationObserver(record).observe(indicator, {attributes: true, childList: true, subtree: true,
                                                     characterData: true});
}"""


@pytest.fixture
def room_page(web_tier, room, make_user, monkeypatch) -> Iterator[Page]:
    """alice's page of a new room, through the load balancer, once its socket is connected."""
    # Playwright's sync API keeps an asyncio loop running in this thread (tests/e2e/conftest.py).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    cookie = session_cookie(make_user("alice"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=web_tier.http_url, viewport={"width": 1100, "height": 760})
            context.add_cookies([{"name": "sessionid", "value": cookie, "url": web_tier.http_url}])
            page = context.new_page()
            page.goto(f"/rooms/{room.slug}/")
            expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
            yield page
        finally:
            browser.close()


def test_page_reconnects_at_once_to_another_process_after_a_restart_and_shows_no_error(
    web_tier, room, room_page, make_user
):
    page = room_page
    sessions = web_tier.sessions()
    (leaving,) = [server for server in web_tier.servers if sessions[server.port] == 1]
    (staying,) = [server for server in web_tier.servers if server is not leaving]
    page.evaluate(RECORD_CONNECTION_STATES)

    leaving.child.send_signal(signal.SIGTERM)
    page.get_by_test_id("composer-input").fill("typed while a server restarts")
    page.get_by_test_id("composer-input").press("Enter")
    assert leaving.child.wait(timeout=30) == 0
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
    store_message(room=room, author=make_user("bob"), text="and an answer")

    messages = page.get_by_test_id("message-list").get_by_test_id("message")
    expect(messages.get_by_test_id("message-text")).to_have_text(
        ["typed while a server restarts", "and an answer"]
    )
    expect(messages.nth(0)).to_have_attribute("data-state", "sent")
    assert page.evaluate("window.__connection") == ["reconnecting: Reconnecting…", "connected: Connected"]
    expect(page.get_by_test_id("notice")).to_be_hidden()
    expect(page.get_by_test_id("message-error")).to_have_count(0)
    assert web_tier.sessions()[staying.port] == 1
