"""Logging in and room access, through the real pages in a browser."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_login_form_leads_to_the_rooms_page(make_user, make_room, new_context, live_daphne):
    make_user("alice")
    make_room("general")
    page = new_context().new_page()

    page.goto("/accounts/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-for-tests-1")
    page.get_by_role("button", name="Log in").click()

    expect(page).to_have_url(f"{live_daphne.http_url}/")
    expect(page.get_by_test_id("nav-user")).to_have_text("alice")
    expect(page.get_by_test_id("room-item")).to_have_attribute("data-slug", "general")


def test_private_room_is_neither_listed_nor_reachable_for_a_non_member(make_user, make_room, new_context):
    alice, bob = make_user("alice"), make_user("bob")
    make_room("general")
    make_room("secret", is_private=True, members=(alice,))
    page = new_context(bob).new_page()

    page.goto("/")
    expect(page.get_by_test_id("room-item")).to_have_count(1)
    expect(page.get_by_test_id("room-item")).to_have_attribute("data-slug", "general")
    response = page.goto("/rooms/secret/")

    assert response is not None and response.status == 404
    expect(page.get_by_test_id("message-list")).to_have_count(0)


def test_wrong_passwords_lead_to_a_lockout_page_that_refuses_the_right_one(make_user, new_context, settings):
    """Through daphne (axes' async middleware path) with the default limits."""
    make_user("alice")
    page = new_context().new_page()

    def submit(password: str) -> None:
        page.goto("/accounts/login/")
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()

    for _ in range(settings.LOGIN_FAILURES_PER_USERNAME - 1):
        submit("wrong")
        expect(page.get_by_role("alert")).to_contain_text("Please enter a correct username and password")
    submit("wrong")
    expect(page.get_by_test_id("login-locked")).to_contain_text("The account “alice” is locked")
    submit("pw-for-tests-1")

    expect(page.get_by_test_id("login-locked")).to_contain_text("Try again in 15 minutes.")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
