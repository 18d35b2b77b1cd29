from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from monitoring.selectors import active_alerts, user_sees_alerts


def staff_alerts(request: HttpRequest) -> dict[str, Any]:
    """`active_alerts` for the staff banner on every page (chat and admin); nothing for others."""
    user = getattr(request, "user", None)
    if user is None or not user_sees_alerts(user=user):
        return {}
    return {"active_alerts": active_alerts(), "show_alert_banner": True}
