"""The periodic alert check: one notification per level change, through every channel."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from deadletters.models import DeadLetter
from monitoring.models import AlertLevel, AlertState
from monitoring.services import DEAD_LETTERS_KEY, alerts_check
from tests.conftest import grant_permission
from tests.monitoring.conftest import sample, scrape

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def thresholds(settings, broker_url):
    # broker_url: the queue part of the check reads this session's own vhost.
    settings.ADMINS = [("Ops", "ops@example.com")]
    settings.DLQ_WARNING_COUNT = 3
    settings.DLQ_CRITICAL_COUNT = 10
    settings.DLQ_WARNING_AGE_SECONDS = 3600
    settings.DLQ_CRITICAL_AGE_SECONDS = 86400


def mails_about(mailoutbox, key: str) -> list:
    return [mail for mail in mailoutbox if f"] {key}" in mail.subject]


def test_dead_letters_past_warning_send_one_mail_and_one_webhook(make_dead_letters, mailoutbox, webhook):
    make_dead_letters(3)

    alerts_check()

    mails = mails_about(mailoutbox, DEAD_LETTERS_KEY)
    assert len(mails) == 1
    assert mails[0].to == ["ops@example.com"]
    assert "[WARNING] dead_letters" in mails[0].subject
    assert "3 unresolved dead letters" in mails[0].subject
    [body] = webhook.about(DEAD_LETTERS_KEY)
    assert body["text"].startswith("[WARNING] dead_letters: 3 unresolved dead letters")
    assert body["alert"]["state"] == "firing"


def test_alert_level_and_dead_letter_count_show_in_metrics(make_dead_letters, webhook):
    make_dead_letters(3)
    make_dead_letters(2, status=DeadLetter.Status.DISCARDED)

    alerts_check()

    text = scrape()
    assert sample(text, "chat_alert_level", alert=DEAD_LETTERS_KEY) == AlertLevel.WARNING
    assert sample(text, "chat_dead_letters", status="new") == 3
    assert sample(text, "chat_dead_letters", status="discarded") == 2


def test_second_check_at_the_same_level_sends_nothing(make_dead_letters, mailoutbox, webhook):
    make_dead_letters(3)
    alerts_check()
    make_dead_letters(1)  # still WARNING: the summary changes, the level does not

    transitions = alerts_check()

    assert [t for t in transitions if t.key == DEAD_LETTERS_KEY] == []
    assert len(mails_about(mailoutbox, DEAD_LETTERS_KEY)) == 1
    assert len(webhook.about(DEAD_LETTERS_KEY)) == 1
    assert AlertState.objects.get(key=DEAD_LETTERS_KEY).summary.startswith("4 unresolved")


def test_draining_the_dead_letters_sends_one_resolved(make_dead_letters, mailoutbox, webhook):
    letters = make_dead_letters(3)
    alerts_check()
    DeadLetter.objects.filter(pk__in=[d.pk for d in letters]).update(status=DeadLetter.Status.REPLAYED)

    alerts_check()
    alerts_check()

    mails = mails_about(mailoutbox, DEAD_LETTERS_KEY)
    assert [m.subject.removeprefix("[chat] ").split("]")[0] for m in mails] == ["[WARNING", "[RESOLVED"]
    resolved = webhook.about(DEAD_LETTERS_KEY)[-1]
    assert resolved["alert"]["state"] == "resolved"
    assert len(webhook.about(DEAD_LETTERS_KEY)) == 2
    assert sample(scrape(), "chat_alert_level", alert=DEAD_LETTERS_KEY) == AlertLevel.OK


def test_crossing_critical_after_warning_escalates_once(make_dead_letters, mailoutbox, webhook):
    make_dead_letters(3)
    alerts_check()
    make_dead_letters(7)

    alerts_check()
    alerts_check()

    subjects = [m.subject for m in mails_about(mailoutbox, DEAD_LETTERS_KEY)]
    assert len(subjects) == 2
    assert subjects[1].startswith("[chat] [CRITICAL] dead_letters (was WARNING): 10 unresolved")


def test_one_old_dead_letter_is_critical_by_age(make_dead_letters, webhook):
    from datetime import timedelta

    from django.utils import timezone

    make_dead_letters(1, died_at=timezone.now() - timedelta(days=2))

    alerts_check()

    assert AlertState.objects.get(key=DEAD_LETTERS_KEY).level == AlertLevel.CRITICAL


def test_failing_webhook_does_not_stop_the_mail(make_dead_letters, mailoutbox, settings):
    settings.ALERT_WEBHOOK_URL = "http://127.0.0.1:9/unreachable"
    make_dead_letters(3)

    alerts_check()

    assert len(mails_about(mailoutbox, DEAD_LETTERS_KEY)) == 1


def test_banner_lists_active_alerts_for_staff_only(make_dead_letters, client):
    make_dead_letters(3)
    alerts_check()
    staff = get_user_model().objects.create_user("ops", password="pw-for-tests-1", is_staff=True)
    grant_permission(staff, "deadletters.view_deadletter")
    intern = get_user_model().objects.create_user("intern", password="pw-for-tests-1", is_staff=True)
    member = get_user_model().objects.create_user("member", password="pw-for-tests-1")

    client.force_login(staff)
    staff_page = client.get("/", HTTP_HOST="localhost").content.decode()
    client.force_login(intern)
    intern_page = client.get("/", HTTP_HOST="localhost").content.decode()
    client.force_login(member)
    member_page = client.get("/", HTTP_HOST="localhost").content.decode()

    assert 'data-alert="dead_letters"' in staff_page
    assert "3 unresolved dead letters" in staff_page
    assert 'id="staff-alerts"' not in intern_page, "staff without the dead-letter permission see no banner"
    assert 'id="staff-alerts"' not in member_page


def test_admin_pages_show_the_banner(make_dead_letters, client):
    make_dead_letters(3)
    alerts_check()
    staff = get_user_model().objects.create_superuser("root", password="pw-for-tests-1")
    client.force_login(staff)

    page = client.get("/admin/", HTTP_HOST="localhost").content.decode()

    assert 'data-alert="dead_letters"' in page
