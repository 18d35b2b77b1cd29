from __future__ import annotations

import pytest
from django.contrib.sessions.models import Session
from django.test import Client, override_settings

from chat import selectors


def _session_key(user) -> str:
    client = Client()
    client.force_login(user)
    return client.session.session_key


@pytest.mark.django_db
def test_session_user_is_the_logged_in_user_until_the_password_changes(make_user):
    alice = make_user("alice")
    key = _session_key(alice)
    assert selectors.session_user(session_key=key) == alice

    alice.set_password("a-new-password-42")
    alice.save()

    assert selectors.session_user(session_key=key) is None


@pytest.mark.django_db
def test_session_verified_by_a_fallback_secret_key_stays_valid_and_unchanged(make_user, settings):
    alice = make_user("alice")
    key = _session_key(alice)
    before = Session.objects.get(session_key=key).session_data

    with override_settings(
        SECRET_KEY="a-rotated-secret-key-" + "y" * 40, SECRET_KEY_FALLBACKS=[settings.SECRET_KEY]
    ):
        assert selectors.session_user(session_key=key) == alice

    # Django's get_user would have moved it to a new key, logging the browser out.
    assert Session.objects.get(session_key=key).session_data == before
