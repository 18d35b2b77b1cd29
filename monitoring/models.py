"""Alert state persisted between checks, so an alert fires once per level change, not every run."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class AlertLevel(models.IntegerChoices):
    # Values are Nagios exit codes (check_dlq) and the value of the chat_alert_level metric.
    OK = 0, "OK"
    WARNING = 1, "WARNING"
    CRITICAL = 2, "CRITICAL"


class AlertState(models.Model):
    """The current level of one check (`dead_letters`, `queue_without_consumer:analytics`, ...)."""

    key = models.CharField(max_length=200, unique=True)
    level = models.PositiveSmallIntegerField(choices=AlertLevel.choices, default=AlertLevel.OK)
    summary = models.CharField(max_length=500, blank=True)
    # When the level last changed (the alert's "since"), and when a check last looked.
    changed_at = models.DateTimeField(default=timezone.now)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-level", "key"]

    def __str__(self) -> str:
        return f"{self.key}: {self.get_level_display()}"


class QueueSample(models.Model):
    """A queue's depth at one check; the recent ones give its drain rate."""

    queue = models.CharField(max_length=200)
    messages = models.PositiveBigIntegerField()
    consumers = models.PositiveIntegerField()
    sampled_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["queue", "sampled_at"], name="queuesample_queue_time_idx")]

    def __str__(self) -> str:
        return f"{self.queue}: {self.messages} at {self.sampled_at:%H:%M:%S}"
