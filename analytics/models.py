"""Aggregates of chat events, and the ledger that makes counting them effectively-once.

The aggregates reference rooms and users without database constraints on purpose: they are
derived facts about events that happened, and a deleted room or user must not make a queued
event impossible to count (it would be dead-lettered for no fault of its own).
"""

from django.conf import settings
from django.db import models

from chat.models import Room


class ProcessedEvent(models.Model):
    """One row per event the pipeline has counted, written in the same transaction as the counts.

    A redelivered or duplicated event finds its id here and changes nothing. `created_at` (when
    the message was stored) and `processed_at` (when it was counted) give the pipeline's lag.
    """

    event_id = models.UUIDField(primary_key=True)
    message_id = models.BigIntegerField()
    room = models.ForeignKey(Room, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    created_at = models.DateTimeField()
    processed_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return str(self.event_id)


class LedgerPrune(models.Model):
    """How far the ledger has been pruned: rows of events counted before `pruned_before` may be gone.

    A single row (id 1, created by the migration; null until the first prune), moved forward by
    processed_events_prune before it deletes anything. It keeps ledger_horizon() from moving
    back when ANALYTICS_LEDGER_RETENTION_DAYS is raised: rows an earlier, shorter retention
    deleted stay deleted, so their events must stay refused. Counting transactions hold it FOR
    SHARE, so a prune cannot move it under them.
    """

    pruned_before = models.DateTimeField(null=True)

    def __str__(self) -> str:
        if self.pruned_before is None:
            return "ledger never pruned"
        return f"ledger pruned before {self.pruned_before:%Y-%m-%d %H:%M}"


class RoomMinuteCount(models.Model):
    """Messages stored in a room during one UTC minute (`minute` is the minute's start)."""

    room = models.ForeignKey(Room, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    minute = models.DateTimeField()
    count = models.PositiveIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["room", "minute"], name="room_minute_unique")]
        indexes = [models.Index(fields=["minute"], name="room_minute_minute_idx")]
        # The page and the charts are drawn from these counts; the permission opens /analytics/.
        permissions = [("view_analytics", "Can view the analytics page")]

    def __str__(self) -> str:
        return f"room {self.room_id} @ {self.minute:%Y-%m-%d %H:%M}: {self.count}"


class UserMessageCount(models.Model):
    """All messages a user has written, over every room."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        primary_key=True,
        related_name="+",
    )
    count = models.PositiveIntegerField()
    last_message_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"user {self.user_id}: {self.count}"


class RoomDayUserCount(models.Model):
    """Messages a user wrote in a room on one UTC day; the rows of a (room, day) are its active users."""

    room = models.ForeignKey(Room, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    day = models.DateField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    count = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "day", "user"], name="room_day_user_unique"),
        ]

    def __str__(self) -> str:
        return f"room {self.room_id} {self.day} user {self.user_id}: {self.count}"
