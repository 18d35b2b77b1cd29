"""A staff member replays a dead letter from the admin in Debian's Chromium, against a real daphne."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from bench.procfile import DaphneServer
from deadletters.models import DeadLetter, DeadLetterAction
from tests.conftest import session_cookie
from tests.deadletters.conftest import archive_letter
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, EXPECT_TIMEOUT_MS

pytestmark = [pytest.mark.browser, pytest.mark.broker]


@pytest.fixture
def server(live_daphne: DaphneServer, broker_url: str) -> DaphneServer:
    # Replays publish to this session's vhost.
    live_daphne.extra_env["CELERY_BROKER_URL"] = broker_url
    live_daphne.restart()
    return live_daphne


@pytest.fixture
def chromium(server: DaphneServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    # Playwright's sync API keeps an event loop in this thread; the ORM calls of the test itself
    # are still plain synchronous ones (see tests/e2e/conftest.py).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_staff_replays_a_dead_letter_through_the_action_and_confirmation_page(
    server: DaphneServer, chromium: Browser, make_user
):
    operator = make_user("operator", is_staff=True, is_superuser=True)
    letter = archive_letter(task_id="task-for-the-browser")
    context = chromium.new_context(base_url=server.http_url)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    context.add_cookies([{"name": "sessionid", "value": session_cookie(operator), "url": server.http_url}])
    page = context.new_page()

    page.goto("/admin/deadletters/deadletter/")
    expect(page.locator("#result_list")).to_contain_text("analytics.record_chat_events")
    page.locator(f"input[name='_selected_action'][value='{letter.pk}']").check()
    page.select_option("select[name='action']", "replay_dead_letters")
    page.locator("button[name='index']").click()

    expect(page.get_by_test_id("confirm-count")).to_contain_text("replay 1 dead letter")
    page.get_by_test_id("confirm-action").click()

    expect(page.locator("ul.messagelist")).to_contain_text("1 dead letters replayed.")
    expect(page.locator("#result_list")).to_contain_text("replayed")
    letter.refresh_from_db()
    assert (letter.status, letter.replay_count) == (DeadLetter.Status.REPLAYED, 1)
    assert DeadLetterAction.objects.get(dead_letter=letter).actor_label == "operator"
    context.close()
