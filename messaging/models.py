"""The outbox: events written in their cause's transaction, published by the relay."""

from django.db import models


class OutboxEvent(models.Model):
    """An event to publish to RabbitMQ, written in the same transaction as its cause.

    The relay (messaging/relay.py) publishes pending rows and sets `sent_at` only after the
    broker confirmed them, so a crash anywhere means a resend, never a loss.
    """

    event_id = models.UUIDField(unique=True)
    routing_key = models.CharField(max_length=100)
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # Created by chat's first migration, before this app existed; chat's 0004 puts the NOTIFY
        # trigger the relay listens to on it.
        db_table = "chat_outboxevent"
        indexes = [
            models.Index(fields=["id"], name="outbox_pending_idx", condition=models.Q(sent_at__isnull=True)),
            models.Index(fields=["sent_at"], name="outbox_sent_at_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.routing_key} {self.event_id}"
