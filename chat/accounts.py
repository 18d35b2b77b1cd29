"""Who may try to authenticate: login lockouts (django-axes) and the sign-up limit per client address.

django-axes records each failed login (its AccessAttempt rows, one per username and address) and
refuses logins while locked. It compares one count with one limit; here a username and an address
each have their own: a username locks after LOGIN_FAILURES_PER_USERNAME failures from any
addresses (guessing one account's password from many machines), an address after
LOGIN_FAILURES_PER_ADDRESS failures for any usernames (trying many accounts from one machine,
set higher since many people can share an office's address). Failures count for
LOGIN_LOCKOUT_MINUTES after the last one, and a lock ends that long after the failure that set it;
staff lift it sooner by deleting the access attempts in the admin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username
from axes.models import AccessAttempt
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from chat.client_address import client_address


@dataclass(frozen=True)
class FailureTally:
    """Recent failed logins of one username or one address, against its own limit."""

    subject: Literal["account", "address"]
    failures: int
    limit: int
    # When enough of the failures have expired to fall below the limit; None when below already.
    locked_until: datetime | None


@dataclass(frozen=True)
class LoginLockout:
    subject: Literal["account", "address"]
    until: datetime

    def minutes_left(self, *, now: datetime) -> int:
        return max(1, math.ceil((self.until - now).total_seconds() / 60))


def _lock_end(rows: list[tuple[datetime, int]], *, limit: int, cool_off: timedelta) -> datetime | None:
    """When failures (each row: last failure time, count) fall below `limit` as rows expire.

    Rows expire oldest first, so the lock holds while the newest rows that reach the limit do.
    """
    newest = 0
    for last_failure, count in sorted(rows, reverse=True):
        newest += count
        if newest >= limit:
            return last_failure + cool_off
    return None


def login_failure_tallies(
    *, username: str | None, ip_address: str | None, now: datetime
) -> list[FailureTally]:
    """The username's and the address's failures within the cool-off before `now` (those given)."""
    cool_off: timedelta = settings.AXES_COOLOFF_TIME
    recent = AccessAttempt.objects.filter(attempt_time__gte=now - cool_off)
    subjects: list[tuple[Literal["account", "address"], dict[str, str], int]] = []
    if username:
        subjects.append(("account", {"username": username}, settings.LOGIN_FAILURES_PER_USERNAME))
    if ip_address:
        subjects.append(("address", {"ip_address": ip_address}, settings.LOGIN_FAILURES_PER_ADDRESS))
    tallies = []
    for subject, filters, limit in subjects:
        rows = list(recent.filter(**filters).values_list("attempt_time", "failures_since_start"))
        tallies.append(
            FailureTally(
                subject=subject,
                failures=sum(count for _, count in rows),
                limit=limit,
                locked_until=_lock_end(rows, limit=limit, cool_off=cool_off),
            )
        )
    return tallies


def login_lockout(*, username: str | None, ip_address: str | None, now: datetime) -> LoginLockout | None:
    """The lock on this username or address that lasts longest; None when neither is locked."""
    locks = [
        LoginLockout(subject=tally.subject, until=tally.locked_until)
        for tally in login_failure_tallies(username=username, ip_address=ip_address, now=now)
        if tally.locked_until is not None
    ]
    return max(locks, key=lambda lock: lock.until, default=None)


class LoginLockoutHandler(AxesDatabaseHandler):
    """AXES_HANDLER: axes' database handler with a limit of their own for usernames and addresses."""

    def get_failures(self, request: HttpRequest, credentials: dict | None = None) -> int:
        # Axes locks when this reaches AXES_FAILURE_LIMIT: report that limit less the failures left
        # before the first of the two limits is reached.
        tallies = login_failure_tallies(
            username=get_client_username(request, credentials),
            ip_address=request.axes_ip_address,
            now=request.axes_attempt_time,
        )
        left = min((tally.limit - tally.failures for tally in tallies), default=settings.AXES_FAILURE_LIMIT)
        return settings.AXES_FAILURE_LIMIT - left


def lockout_response(
    request: HttpRequest, original_response: Any = None, credentials: dict | None = None
) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: the lockout page (429), saying what is locked and for how long.

    Axes' async middleware (under daphne) passes the credentials in the response's place and None
    for them; the username then comes from the posted form, where axes itself reads it.
    """
    username = get_client_username(request, credentials)
    now = timezone.now()
    ip_address = getattr(request, "axes_ip_address", None) or client_address(request)
    lockout = login_lockout(username=username, ip_address=ip_address, now=now)
    context = {
        "lockout": lockout,
        "username": username,
        "minutes": lockout.minutes_left(now=now) if lockout else None,
    }
    return render(request, "registration/locked_out.html", context, status=429)
