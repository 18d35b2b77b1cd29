"""Reads of the analytics aggregates, for the staff page, the room API and the lag benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Count, QuerySet, Sum
from django.utils import timezone

from analytics.models import ProcessedEvent, RoomDayUserCount, RoomMinuteCount, UserMessageCount
from chat import selectors as chat_selectors
from chat.models import Room


def rooms_with_visible_figures(*, user: AbstractBaseUser) -> QuerySet[Room]:
    """The rooms whose figures `user` may see: those they may read (public rooms, private rooms they
    are a member of). The analytics permission opens the page, not private rooms; a superuser, who
    can read every message in the admin anyway, sees every room."""
    if user.is_superuser:
        return Room.objects.all()
    return chat_selectors.rooms_for_user(user=user)


def _minute_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def room_message_count(*, room_id: int) -> int:
    """Messages of the room the pipeline has counted so far."""
    total = RoomMinuteCount.objects.filter(room_id=room_id).aggregate(total=Sum("count"))["total"]
    return total or 0


def room_minute_series(
    *, room_id: int, minutes: int = 60, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Messages per minute for the last `minutes` minutes, oldest first, with zero-filled gaps."""
    end = _minute_floor(now or timezone.now())
    start = end - timedelta(minutes=minutes - 1)
    counts = dict(
        RoomMinuteCount.objects.filter(room_id=room_id, minute__gte=start, minute__lte=end).values_list(
            "minute", "count"
        )
    )
    return [
        {
            "minute": (start + timedelta(minutes=i)).isoformat(),
            "count": counts.get(start + timedelta(minutes=i), 0),
        }
        for i in range(minutes)
    ]


def room_active_users(*, room_id: int, day: Any = None) -> int:
    """How many users wrote in the room on `day` (UTC; today by default)."""
    day = day or timezone.now().astimezone(UTC).date()
    return RoomDayUserCount.objects.filter(room_id=room_id, day=day).count()


def room_summary(*, room: Room, now: datetime | None = None) -> dict[str, Any]:
    """The JSON body of GET /api/analytics/rooms/<slug>/."""
    now = now or timezone.now()
    return {
        "room": room.slug,
        "message_count": room_message_count(room_id=room.pk),
        "active_users_today": room_active_users(room_id=room.pk, day=now.astimezone(UTC).date()),
        "per_minute": room_minute_series(room_id=room.pk, now=now),
    }


@dataclass(frozen=True)
class RoomRank:
    room_id: int
    slug: str
    name: str
    count: int


def busiest_rooms(*, since: datetime, rooms: QuerySet[Room], limit: int = 10) -> list[RoomRank]:
    """Of `rooms`, those with the most messages stored since `since`, most first."""
    rows = (
        RoomMinuteCount.objects.filter(minute__gte=_minute_floor(since), room_id__in=rooms.values("pk"))
        .values("room_id")
        .annotate(total=Sum("count"))
        .order_by("-total", "room_id")[:limit]
    )
    totals = {row["room_id"]: row["total"] for row in rows}
    rooms = Room.objects.in_bulk(list(totals))
    return [
        RoomRank(room_id=room_id, slug=rooms[room_id].slug, name=rooms[room_id].name, count=total)
        for room_id, total in totals.items()
        if room_id in rooms
    ]


@dataclass(frozen=True)
class UserRank:
    username: str
    count: int


def most_active_users(*, limit: int = 10) -> list[UserRank]:
    """Users by messages written over all rooms, most first."""
    rows = list(UserMessageCount.objects.order_by("-count", "user_id")[:limit])
    users = get_user_model().objects.in_bulk([row.user_id for row in rows])
    return [
        UserRank(username=users[row.user_id].get_username(), count=row.count)
        for row in rows
        if row.user_id in users
    ]


def rooms_minute_series(
    *, since: datetime, rooms: QuerySet[Room], limit: int = 8, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Per-minute series of the busiest of `rooms` since `since`, for the staff page's line chart."""
    end = _minute_floor(now or timezone.now())
    minutes = int((end - _minute_floor(since)).total_seconds() // 60) + 1
    return [
        {"room": rank.slug, "points": [p["count"] for p in series], "start": series[0]["minute"]}
        for rank in busiest_rooms(since=since, rooms=rooms, limit=limit)
        for series in [room_minute_series(room_id=rank.room_id, minutes=minutes, now=end)]
    ]


def active_users_by_room(*, day: Any = None) -> dict[int, int]:
    day = day or timezone.now().astimezone(UTC).date()
    rows = RoomDayUserCount.objects.filter(day=day).values("room_id").annotate(users=Count("user_id"))
    return {row["room_id"]: row["users"] for row in rows}


@dataclass(frozen=True)
class LagStats:
    events: int
    p50_seconds: float | None
    p99_seconds: float | None
    max_seconds: float | None


def processing_lag(*, message_ids: list[int]) -> LagStats:
    """Lag from message stored (created_at) to counted (processed_at), over the given messages."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - created_at)), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - created_at)), "
            "max(extract(epoch FROM processed_at - created_at)) "
            f"FROM {ProcessedEvent._meta.db_table} WHERE message_id = ANY(%s)",
            [list(message_ids)],
        )
        count, p50, p99, worst = cursor.fetchone()
    return LagStats(
        events=count,
        p50_seconds=None if p50 is None else float(p50),
        p99_seconds=None if p99 is None else float(p99),
        max_seconds=None if worst is None else float(worst),
    )
