"""The staff banner in a real browser: an alert appears on the open chat page and goes when resolved."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from deadletters.models import DeadLetter
from monitoring.services import alerts_check
from tests.conftest import grant_permission
from tests.e2e.conftest import off_loop

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_alert_appears_live_for_staff_and_goes_when_resolved(
    make_user,
    make_room,
    make_dead_letters,
    open_room,
    settings,
    broker_url,
):
    settings.DLQ_WARNING_COUNT = 1
    ops = make_user("ops", is_staff=True)
    grant_permission(ops, "deadletters.view_deadletter")
    make_room("general", members=(ops,))
    page = open_room(ops, "general")
    banner = page.get_by_test_id("staff-alerts")
    expect(banner).to_have_attribute("data-state", "connected")
    line = page.locator('[data-alert="dead_letters"]')
    expect(line).to_have_count(0)

    make_dead_letters(1)
    off_loop(alerts_check)
    expect(line).to_contain_text("WARNING")
    expect(line).to_contain_text("1 unresolved dead letter")

    DeadLetter.objects.update(status=DeadLetter.Status.DISCARDED)
    off_loop(alerts_check)
    expect(line).to_have_count(0)
