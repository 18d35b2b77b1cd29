"""Dead letters archived from RabbitMQ, the failure details workers leave for them, and the audit trail.

Why two tables for one failure: RabbitMQ dead-letters the original message unchanged (it only adds
`x-death`), so the reason a task failed cannot travel inside the message. Instead, the worker
commits a TaskFailure row keyed by the task id BEFORE the message is rejected, and the archiver
joins it to the dead letter by that id (services/task_failures.py: the join works in either order).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class DeadLetter(models.Model):
    """One message RabbitMQ dead-lettered, as the archiver received it from `dead_letters`."""

    class Status(models.TextChoices):
        NEW = "new", "new"
        REPLAYED = "replayed", "replayed"
        DISCARDED = "discarded", "discarded"

    # Statuses a person has decided on: only letters in one of these are ever pruned
    # (dead_letters_prune); a status added later stays until it is listed here.
    RESOLVED_STATUSES = (Status.REPLAYED, Status.DISCARDED)

    class BodyEncoding(models.TextChoices):
        UTF8 = "utf-8", "UTF-8 text"
        BASE64 = "base64", "base64 (binary)"

    # sha256 of the message as delivered (properties, headers, body, x-death included). Not unique:
    # two deaths of identical content are two rows. With ack_pending, it finds the row a redelivery
    # of the same delivery left.
    fingerprint = models.CharField(max_length=64)
    # True from the archiver's commit until RabbitMQ has handled the ack of the delivery the row came
    # from. A redelivered delivery (the archiver died in between) takes over such a row of its
    # fingerprint instead of adding one; see services.archive.dead_letters_archive.
    ack_pending = models.BooleanField(default=True, db_default=True)
    origin_queue = models.CharField(max_length=255, db_index=True)
    origin_exchange = models.CharField(max_length=255, blank=True)
    routing_key = models.CharField(max_length=255, blank=True)
    # RabbitMQ's reason from x-death: rejected, expired, maxlen or delivery_limit.
    reason = models.CharField(max_length=32, db_index=True)
    task_name = models.CharField(max_length=255, blank=True, db_index=True)
    task_id = models.CharField(max_length=255, blank=True, db_index=True)
    message_id = models.CharField(max_length=255, blank=True)
    error_class = models.CharField(max_length=255, blank=True)
    error_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(null=True, blank=True)
    death_count = models.PositiveIntegerField(default=1)
    first_death_at = models.DateTimeField(null=True, blank=True)
    last_death_at = models.DateTimeField(null=True, blank=True, db_index=True)
    x_death = models.JSONField(default=list, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    properties = models.JSONField(default=dict, blank=True)
    body = models.TextField(blank=True)
    body_encoding = models.CharField(max_length=8, choices=BodyEncoding.choices, default=BodyEncoding.UTF8)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW, db_index=True)
    replay_count = models.PositiveIntegerField(default=0)
    last_replayed_at = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-last_death_at", "-id"]
        indexes = [
            models.Index(fields=["status", "-last_death_at"], name="deadletter_status_death_idx"),
            # Only rows still waiting for their ack are looked up by fingerprint.
            models.Index(
                fields=["fingerprint"], condition=models.Q(ack_pending=True), name="deadletter_pending_fp_idx"
            ),
        ]

    def __str__(self) -> str:
        what = self.task_name or self.routing_key or "message"
        return f"{what} from {self.origin_queue} ({self.reason})"


class TaskFailure(models.Model):
    """Why a task failed for good, written by the worker before its message is dead-lettered.

    Deleted once joined to its DeadLetter; rows left over (the reject never happened, e.g. the
    connection dropped and the redelivery succeeded) are pruned by the archiver after a week.
    """

    task_id = models.CharField(max_length=255, primary_key=True)
    task_name = models.CharField(max_length=255, blank=True)
    error_class = models.CharField(max_length=255, blank=True)
    error_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(null=True, blank=True)
    failed_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}]: {self.error_class}"


class DeadLetterAction(models.Model):
    """Audit trail: who replayed or discarded which dead letter, and when."""

    class Kind(models.TextChoices):
        REPLAYED = "replayed", "replayed"
        DISCARDED = "discarded", "discarded"

    dead_letter = models.ForeignKey(DeadLetter, on_delete=models.CASCADE, related_name="actions")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The username, or `cli:<os user>` for manage.py dlq; kept even if the user is deleted.
    actor_label = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.actor_label} {self.kind} #{self.dead_letter_id}"
