"""An idle fallback-email sweep logs nothing on the notifier; one that emails still logs its result."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from django.utils import timezone
from kombu import Connection

from chat import services
from chat.models import NotificationDelivery
from chat.task_logging import FALLBACK_SWEEP_TASK, IdleFallbackSweepFilter
from chat.tasks import send_notification_fallback_emails
from messaging.topology import NOTIFICATIONS_QUEUE_NAME, declare_topology
from tests.harness import QUIET_WORKER, wait_until
from tests.mail import file_email_env

pytestmark = pytest.mark.django_db(transaction=True)


def push_awaiting_acknowledgement(*, user, message) -> None:
    """A mention pushed to a socket whose page never acknowledged it, due for the email now."""
    now = timezone.now()
    NotificationDelivery.objects.create(
        notification_id=uuid.uuid4(),
        user=user,
        message=message,
        kind="mention",
        priority=0,
        channel=NotificationDelivery.CHANNEL_SOCKET,
        queued_at=now,
        pushed_at=now,
        ack_deadline=now,
    )


@pytest.mark.broker
def test_idle_sweeps_add_no_log_lines_and_a_sweep_that_emails_logs_its_result(
    broker_url, processes, tmp_path, make_user, make_room
):
    alice, bob, room = make_user("alice", email="alice@example.com"), make_user("bob"), make_room("general")
    with Connection(broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(NOTIFICATIONS_QUEUE_NAME)
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    notifier = processes.start_consumer(
        "notifier", NOTIFICATIONS_QUEUE_NAME, QUIET_WORKER, env=file_email_env(mail_dir)
    )
    log = Path(notifier.log_path)
    # The lines counted start after Celery's " ready.", the end of its start-up output, which can
    # come after the consumer count the harness waits for.
    wait_until(lambda: " ready." in log.read_text(), timeout=30, message="the notifier says it is ready")
    ready_at = len(log.read_text())

    for _ in range(3):
        send_notification_fallback_emails.delay()  # nothing is due: idle
    # Then one with work: a push no page acknowledged, due at once; whichever of the notifier's
    # processes runs it, its result is the one line logged.
    push_awaiting_acknowledgement(
        user=alice,
        message=services.message_create(
            room=room, author=bob, text="@alice still there?", client_id=uuid.uuid4()
        ).message,
    )
    send_notification_fallback_emails.delay()
    wait_until(
        lambda: "'emailed': 1" in log.read_text(), timeout=60, message="the working sweep logged its result"
    )

    lines = log.read_text()[ready_at:].splitlines()
    assert NotificationDelivery.objects.get(user=alice).channel == NotificationDelivery.CHANNEL_EMAIL
    assert len(lines) == 1, lines
    assert "chat.send_notification_fallback_emails" in lines[0] and "succeeded" in lines[0]


def test_beat_logs_no_line_for_sending_the_sweep_but_still_for_other_tasks():

    def beat_line(entry: str, task: str) -> logging.LogRecord:
        return logging.LogRecord(
            "celery.beat",
            logging.INFO,
            __file__,
            1,
            "Scheduler: Sending due task %s (%s)",
            (entry, task),
            None,
        )

    quiet = IdleFallbackSweepFilter()
    assert not quiet.filter(beat_line("chat-send-notification-fallback-emails", FALLBACK_SWEEP_TASK))
    assert quiet.filter(beat_line("monitoring-check-alerts", "monitoring.check_alerts"))
