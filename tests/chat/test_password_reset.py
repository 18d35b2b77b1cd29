"""The password reset pages: linked from the login page, in the site's layout, not the admin's."""

from __future__ import annotations

import re

import pytest
from django.core import mail
from django.test import Client

pytestmark = pytest.mark.django_db


def page(response) -> str:
    assert response.status_code == 200
    text = response.content.decode()
    assert 'class="topbar"' in text and "Django administration" not in text
    return text


def test_login_page_links_to_the_password_reset():
    login = page(Client().get("/accounts/login/"))

    assert 'href="/accounts/password_reset/" data-testid="forgot-password"' in login


def test_a_password_reset_goes_through_the_sites_pages(make_user):
    make_user("alice", email="alice@example.com")
    client = Client()

    assert "<h1>Reset your password</h1>" in page(client.get("/accounts/password_reset/"))
    done = client.post("/accounts/password_reset/", {"email": "alice@example.com"}, follow=True)
    assert "<h1>Check your email</h1>" in page(done)
    link = re.search(r"https?://\S+/accounts/reset/\S+/", mail.outbox[0].body).group(0)
    confirm = client.get(link, follow=True)
    assert "<h1>Choose a new password</h1>" in page(confirm)
    new_password = "a-new-password-2026"
    complete = client.post(
        confirm.redirect_chain[-1][0],
        {"new_password1": new_password, "new_password2": new_password},
        follow=True,
    )
    assert "<h1>Password changed</h1>" in page(complete)
    assert "<h1>This link does not work</h1>" in page(client.get(link, follow=True))
