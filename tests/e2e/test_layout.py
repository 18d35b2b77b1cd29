"""The pages on a phone's screen: the top bar fits, whatever the username and links."""

from __future__ import annotations

import os

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import grant_permission

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = {"width": 390, "height": 844}
# A directory to keep each page's screenshot in, to look at the layout (unset: none taken).
SCREENSHOT_DIR = os.environ.get("SCREENSHOT_DIR", "")


def top_bar_fits(page: Page, name: str) -> None:
    if SCREENSHOT_DIR:
        page.screenshot(path=f"{SCREENSHOT_DIR}/{name}.png")
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
    for test_id in ("nav-rooms", "nav-analytics", "nav-admin", "nav-user", "logout"):
        box = page.get_by_test_id(test_id).bounding_box()
        assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= PHONE["width"], test_id
    # One line each: a wrapped "Team chat" or "Log out" has a box per line.
    for locator in (page.locator(".brand"), page.get_by_test_id("logout")):
        assert locator.evaluate("element => element.getClientRects().length") == 1


@pytest.mark.parametrize("path", ["/", "/rooms/general/", "/analytics/"])
def test_top_bar_of_a_staff_user_with_a_long_name_fits_a_phone(path, new_context, make_user, make_room):
    make_room("general")
    analyst = make_user("analyst-with-a-long1", is_staff=True)
    assert len(analyst.get_username()) == 20
    grant_permission(analyst, "analytics.view_analytics")
    page = new_context(analyst).new_page()
    page.set_viewport_size(PHONE)

    page.goto(path)

    top_bar_fits(page, path.strip("/").replace("/", "-") or "rooms")
    # A shortened name is shown whole on hover.
    expect(page.get_by_test_id("nav-user")).to_have_attribute("title", "analyst-with-a-long1")
