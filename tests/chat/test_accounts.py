"""Login lockouts and the sign-up limit, per username and client address (chat/accounts.py, ratelimit.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt, AccessLog
from django.contrib.auth import get_user_model
from django.test import Client, RequestFactory
from django.utils import timezone

from bench.procfile import free_port
from chat.client_address import client_address

pytestmark = pytest.mark.django_db

PASSWORD = "pw-for-tests-1"  # make_user's


@pytest.fixture
def limits(settings):
    """Small limits, so a test needs few (slow, hashed) password checks."""
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    settings.LOGIN_FAILURES_PER_ADDRESS = 5
    settings.SIGNUPS_PER_ADDRESS_PER_HOUR = 2
    return settings


def log_in(username: str, password: str, *, address: str = "10.0.0.1", path="/accounts/login/", **headers):
    client = Client()
    response = client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address, **headers)
    return client, response


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_nth_wrong_password_locks_the_account_and_then_refuses_the_right_one(limits, make_user):
    make_user("alice")
    for _ in range(2):
        _, response = log_in("alice", "wrong")
        assert response.status_code == 200
        assert b"Please enter a correct username and password" in response.content

    _, locked = log_in("alice", "wrong")
    client, right = log_in("alice", PASSWORD)

    for response in (locked, right):
        assert response.status_code == 429
        page = response.content.decode()
        assert "The account “alice” is locked after too many wrong passwords." in page
        assert "Try again in 15 minutes." in page
    assert not logged_in(client)


def test_failures_for_one_username_from_many_addresses_lock_the_username(limits, make_user):
    make_user("alice")
    make_user("bob")
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        log_in("alice", "wrong", address=address)

    alice, refused = log_in("alice", PASSWORD, address="10.0.0.4")
    bob, accepted = log_in("bob", PASSWORD, address="10.0.0.4")

    assert refused.status_code == 429 and "The account “alice” is locked" in refused.content.decode()
    assert not logged_in(alice)
    assert accepted.status_code == 302 and logged_in(bob)


def test_an_address_trying_many_usernames_is_locked(limits, make_user):
    make_user("alice")
    responses = [log_in(f"guess{n}", "wrong")[1] for n in range(5)]

    same_address, refused = log_in("alice", PASSWORD)
    elsewhere, accepted = log_in("alice", PASSWORD, address="10.0.0.2")

    assert [r.status_code for r in responses] == [200, 200, 200, 200, 429]
    assert refused.status_code == 429 and not logged_in(same_address)
    assert "Logins from your network address are locked" in refused.content.decode()
    assert accepted.status_code == 302 and logged_in(elsewhere)


def test_the_admin_login_is_throttled_too(limits, make_user):
    make_user("root", is_staff=True, is_superuser=True)
    for _ in range(3):
        _, response = log_in("root", "wrong", path="/admin/login/")

    _, right = log_in("root", PASSWORD, path="/admin/login/")

    assert response.status_code == 429 and right.status_code == 429
    assert "The account “root” is locked" in right.content.decode()


def test_staff_deleting_the_access_attempts_in_the_admin_lifts_the_lock(limits, make_user):
    make_user("alice")
    staff = Client()
    staff.force_login(make_user("root", is_staff=True, is_superuser=True))
    for _ in range(3):
        log_in("alice", "wrong")
    assert log_in("alice", PASSWORD)[1].status_code == 429

    listing = staff.get("/admin/axes/accessattempt/", {"q": "alice"})
    assert listing.status_code == 200 and "alice" in listing.content.decode()
    ids = [str(pk) for pk in AccessAttempt.objects.filter(username="alice").values_list("pk", flat=True)]
    deleted = staff.post(
        "/admin/axes/accessattempt/", {"action": "delete_selected", "_selected_action": ids, "post": "yes"}
    )

    assert deleted.status_code == 302
    client, response = log_in("alice", PASSWORD)
    assert response.status_code == 302 and logged_in(client)


def sign_up(username: str, *, address: str = "10.0.0.1", **headers):
    password = "a-long-pass-phrase-9"
    data = {"username": username, "password1": password, "password2": password}
    return Client().post("/accounts/signup/", data, REMOTE_ADDR=address, **headers)


def test_signups_beyond_the_limit_from_one_address_are_refused_and_another_address_is_not(limits):
    first, second = sign_up("dora"), sign_up("eve")

    refused = sign_up("mallory")
    other_address = sign_up("frank", address="10.0.0.2")

    assert first.status_code == second.status_code == 302
    assert refused.status_code == 429
    assert "Too many accounts were created from your network address. Try again in 30 minutes." in (
        refused.content.decode()
    )
    assert not get_user_model().objects.filter(username="mallory").exists()
    assert other_address.status_code == 302


def test_an_invalid_signup_form_does_not_count(limits):
    for _ in range(3):
        assert sign_up("").status_code == 200  # no username: the form's own error

    assert sign_up("dora").status_code == 302


def test_forwarded_for_is_ignored_by_default(limits):
    sign_up("dora", HTTP_X_FORWARDED_FOR="192.0.2.1")
    sign_up("eve", HTTP_X_FORWARDED_FOR="192.0.2.2")

    # All three came from one peer; what they wrote in X-Forwarded-For does not matter.
    assert sign_up("frank", HTTP_X_FORWARDED_FOR="192.0.2.3").status_code == 429


def test_forwarded_for_is_honoured_when_configured(limits, make_user):
    limits.TRUSTED_PROXY_CLIENT_IP_HEADER = "X-Forwarded-For"
    make_user("alice")
    proxy = "10.0.0.1"
    sign_up("dora", address=proxy, HTTP_X_FORWARDED_FOR="192.0.2.1")
    sign_up("eve", address=proxy, HTTP_X_FORWARDED_FOR="192.0.2.1")

    # The proxy appends the real client: a client writing another address first changes nothing.
    spoofed = sign_up("frank", address=proxy, HTTP_X_FORWARDED_FOR="192.0.2.9, 192.0.2.1")
    other_client = sign_up("grace", address=proxy, HTTP_X_FORWARDED_FOR="192.0.2.2")
    log_in("alice", "wrong", address=proxy, HTTP_X_FORWARDED_FOR="192.0.2.3")

    assert spoofed.status_code == 429
    assert other_client.status_code == 302
    assert list(AccessAttempt.objects.values_list("ip_address", flat=True)) == ["192.0.2.3"]


@pytest.mark.parametrize(
    ("header", "count", "forwarded", "expected"),
    [
        ("", 1, "192.0.2.1", "10.0.0.1"),  # not configured: the peer
        ("X-Forwarded-For", 1, "192.0.2.9, 192.0.2.1", "192.0.2.1"),
        ("X-Forwarded-For", 2, "192.0.2.9, 192.0.2.1, 10.1.1.1", "192.0.2.1"),
        ("X-Forwarded-For", 2, "192.0.2.1", "10.0.0.1"),  # fewer entries than proxies: the peer
        ("X-Forwarded-For", 1, "not-an-address", "10.0.0.1"),
        ("X-Forwarded-For", 1, "", "10.0.0.1"),
        ("X-Real-IP", 1, "192.0.2.1", "10.0.0.1"),  # another header than the configured one
        ("X-Forwarded-For", 1, "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address(settings, header, count, forwarded, expected):
    settings.TRUSTED_PROXY_CLIENT_IP_HEADER = header
    settings.TRUSTED_PROXY_COUNT = count
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=forwarded)

    assert client_address(request) == expected


def test_signup_with_redis_down_says_so_and_creates_nothing(limits):
    limits.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"

    response = sign_up("dora")

    assert response.status_code == 503
    assert "Sign-up is unavailable right now: Redis, which counts sign-ups, is down." in response.text
    assert not get_user_model().objects.filter(username="dora").exists()


def test_successful_logins_leave_no_rows_behind(limits, make_user):
    make_user("alice")
    log_in("alice", "wrong")

    for _ in range(3):
        client, _ = log_in("alice", PASSWORD)
        assert logged_in(client)
        client.post("/accounts/logout/")

    assert AccessLog.objects.count() == 0
    assert AccessAttempt.objects.count() == 1  # the failure, until it expires


def test_a_lock_ends_lockout_minutes_after_the_failure_that_set_it(limits, make_user):
    limits.AXES_COOLOFF_TIME = timedelta(minutes=10)  # what LOGIN_LOCKOUT_MINUTES sets at start-up
    make_user("alice")
    for _ in range(3):
        log_in("alice", "wrong")
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=9))
    assert "Try again in 1 minute." in log_in("alice", PASSWORD)[1].content.decode()

    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=10, seconds=1))
    client, response = log_in("alice", PASSWORD)

    assert response.status_code == 302 and logged_in(client)
    assert not AccessAttempt.objects.exists()  # expired attempts are deleted, not kept
