"""Browser fixtures: Debian's Chromium driven by Playwright against the `live_daphne` server.

Playwright's sync API keeps an asyncio loop running in the test's thread. Django refuses ORM
calls there unless DJANGO_ALLOW_ASYNC_UNSAFE is set, and async_to_sync refuses to run at all,
so services that broadcast (message_create) run in a worker thread (`off_loop`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from django.db import connections
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from bench.procfile import DaphneServer
from chat import services
from chat.models import Message, Room
from tests.conftest import session_cookie

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Upper bound for the page to react, not a speed requirement: a reconnect waits out backoff.
EXPECT_TIMEOUT_MS = 30_000

T = TypeVar("T")


def off_loop(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run `function` in a fresh thread (no event loop there) and close its DB connection."""

    def call() -> T:
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


def store_message(*, room: Room, author: Any, text: str) -> Message:
    """Store a message through the service, as another client of the server would."""
    return off_loop(
        services.message_create, room=room, author=author, text=text, client_id=uuid.uuid4()
    ).message


@pytest.fixture
def browser(live_daphne: DaphneServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    # Only this process may skip Django's async-safety check; the server (also after
    # live_daphne.restart()) keeps it.
    live_daphne.extra_env["DJANGO_ALLOW_ASYNC_UNSAFE"] = ""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def new_context(browser: Browser, live_daphne: DaphneServer) -> Callable[..., BrowserContext]:
    """A fresh browser profile, logged in as `user` when given."""

    def make(user: Any = None) -> BrowserContext:
        context = browser.new_context(base_url=live_daphne.http_url, viewport={"width": 1100, "height": 760})
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        if user is not None:
            cookie = session_cookie(user)
            context.add_cookies([{"name": "sessionid", "value": cookie, "url": live_daphne.http_url}])
        return context

    return make


@pytest.fixture
def open_room(new_context: Callable[..., BrowserContext]) -> Callable[..., Page]:
    """The room page of `slug` as `user`, once its socket is connected."""

    def open_page(user: Any, slug: str) -> Page:
        page = new_context(user).new_page()
        page.goto(f"/rooms/{slug}/")
        expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "connected")
        return page

    return open_page
