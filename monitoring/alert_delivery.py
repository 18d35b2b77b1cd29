"""Where an alert's level change goes: the error log, mail_admins, a webhook, the staff banner.

Each channel is independent: one failing (mail server down, webhook unreachable) is logged and
the others still get the alert. Called on commit of the state change (services.py), so a
rolled-back check notifies nothing.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.mail import mail_admins

from monitoring.models import AlertLevel

logger = logging.getLogger("monitoring.alerts")

# Staff sockets (consumers.py) join this group; its name is fixed, never built from user input.
STAFF_ALERTS_GROUP = "monitoring.staff_alerts"
WEBHOOK_TIMEOUT_SECONDS = 5.0


def alert_frame(
    *, key: str, level: int, summary: str, since: str, previous: int | None = None
) -> dict[str, Any]:
    """The `{"type": "alert"}` frame of the staff banner (also the webhook's `alert` field)."""
    return {
        "type": "alert",
        "key": key,
        "level": AlertLevel(level).label,
        "previous": AlertLevel(previous).label if previous is not None else None,
        "state": "resolved" if level == AlertLevel.OK else "firing",
        "summary": summary,
        "since": since,
    }


def alert_text(transition) -> str:
    if transition.resolved:
        return f"[RESOLVED] {transition.key} (was {transition.previous.label}): {transition.summary}"
    verb = "" if transition.previous == AlertLevel.OK else f" (was {transition.previous.label})"
    return f"[{transition.level.label}] {transition.key}{verb}: {transition.summary}"


def alert_deliver(*, transition) -> None:
    """Send one level change of one alert to every channel."""
    text = alert_text(transition)
    frame = alert_frame(
        key=transition.key,
        level=transition.level,
        previous=transition.previous,
        summary=transition.summary,
        since=transition.changed_at.isoformat(),
    )
    rising = transition.level > transition.previous
    logger.log(logging.ERROR if rising else logging.WARNING, "alert %s", text)
    _send_mail(text, transition)
    _post_webhook(text, frame)
    _push_to_staff(frame)


def _send_mail(text: str, transition) -> None:
    try:
        mail_admins(
            subject=text[:200],
            message=(
                f"{text}\n\nAlert: {transition.key}\nLevel: {transition.level.label} "
                f"(was {transition.previous.label})\nSince: {transition.changed_at.isoformat()}\n"
            ),
        )
    except Exception:  # SMTP failures take many forms; the other channels must still run
        logger.exception("alert mail to ADMINS failed: %s", text)


def _post_webhook(text: str, frame: dict[str, Any]) -> None:
    url = settings.ALERT_WEBHOOK_URL
    if not url:
        return
    # Slack (and Mattermost, Rocket.Chat...) incoming webhooks read `text`; `alert` is for scripts.
    body = json.dumps({"text": text, "alert": frame}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        logger.error("alert webhook POST failed (%s): %s", error, text)


def _push_to_staff(frame: dict[str, Any]) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(
            STAFF_ALERTS_GROUP, {"type": "alert.changed", "alert": frame}
        )
    except Exception:  # Redis down: the banner still shows it on the next page load
        logger.exception("alert push to staff sockets failed")
