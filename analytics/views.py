"""HTTP edges of analytics: the staff page and the per-room JSON API."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from analytics import selectors

# The page's charts: the line chart covers the last hour, the rankings the last day.
SERIES_WINDOW = timedelta(hours=1)
RANKING_WINDOW = timedelta(days=1)


@require_GET
@login_required
@permission_required("analytics.view_analytics", raise_exception=True)
def dashboard(request: HttpRequest) -> HttpResponse:
    """The analytics page: anonymous users go to the login page, users without the permission get 403.

    Room figures cover only the rooms the user may read (rooms_with_visible_figures); the users'
    ranking counts each user's messages over all rooms, a total that names no room.
    """
    now = timezone.now()
    rooms = selectors.rooms_with_visible_figures(user=request.user)
    busiest = selectors.busiest_rooms(since=now - RANKING_WINDOW, rooms=rooms)
    active_users = selectors.active_users_by_room()
    context = {
        "busiest_rooms": [
            {"slug": r.slug, "name": r.name, "count": r.count, "active_users": active_users.get(r.room_id, 0)}
            for r in busiest
        ],
        "top_users": [{"username": u.username, "count": u.count} for u in selectors.most_active_users()],
        "series": selectors.rooms_minute_series(since=now - SERIES_WINDOW, rooms=rooms, now=now),
    }
    return render(request, "analytics/dashboard.html", context)


@require_GET
def room_analytics(request: HttpRequest, slug: str) -> JsonResponse:
    """A room's figures, for anyone who may read the room (no staff permission: members see them)."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "authentication required"}, status=401)
    room = selectors.rooms_with_visible_figures(user=request.user).filter(slug=slug).first()
    if room is None:
        # A private room the user is not in is answered like a missing one.
        return JsonResponse({"error": "no such room"}, status=404)
    return JsonResponse(selectors.room_summary(room=room))
