"""HTTP edges of analytics: the staff page and the per-room JSON API."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from analytics import selectors
from chat import selectors as chat_selectors
from chat.models import Room

# The page's charts: the line chart covers the last hour, the rankings the last day.
SERIES_WINDOW = timedelta(hours=1)
RANKING_WINDOW = timedelta(days=1)


@require_GET
@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    busiest = selectors.busiest_rooms(since=now - RANKING_WINDOW)
    active_users = selectors.active_users_by_room()
    context = {
        "busiest_rooms": [
            {"slug": r.slug, "name": r.name, "count": r.count, "active_users": active_users.get(r.room_id, 0)}
            for r in busiest
        ],
        "top_users": [{"username": u.username, "count": u.count} for u in selectors.most_active_users()],
        "series": selectors.rooms_minute_series(since=now - SERIES_WINDOW, now=now),
    }
    return render(request, "analytics/dashboard.html", context)


@require_GET
def room_analytics(request: HttpRequest, slug: str) -> JsonResponse:
    if not request.user.is_authenticated:
        return JsonResponse({"error": "authentication required"}, status=401)
    try:
        if request.user.is_staff:
            room = Room.objects.get(slug=slug)
        else:
            room = chat_selectors.room_for_user(slug=slug, user=request.user)
    except (Room.DoesNotExist, chat_selectors.RoomNotFound, chat_selectors.RoomAccessDenied):
        # A private room the user is not in is answered like a missing one.
        return JsonResponse({"error": "no such room"}, status=404)
    return JsonResponse(selectors.room_summary(room=room))
