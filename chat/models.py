from django.conf import settings
from django.db import models


class Room(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=100)
    is_private = models.BooleanField(default=False)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="rooms", blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # The seq of the room's newest message; incremented in the message's own transaction,
    # so the row lock serialises writers of one room and seq has no gaps.
    last_seq = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    text = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    client_id = models.UUIDField()
    seq = models.BigIntegerField()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq_unique"),
            # Makes a client's resend idempotent: the same client_id from the same author
            # can only ever be stored once.
            models.UniqueConstraint(fields=["author", "client_id"], name="message_author_client_id_unique"),
        ]
        indexes = [models.Index(fields=["room", "id"], name="message_room_id_idx")]

    def __str__(self) -> str:
        return f"{self.room.slug}#{self.seq}"


class NotificationDelivery(models.Model):
    """The ledger of notifications: one row per notification id, ever, and how it reached its user.

    chat/notifications.py writes the row in the transaction that sends the email, or commits it
    before pushing to the user's sockets, so a redelivered task finds it and does nothing. A push
    counts as delivered only once a page acknowledges it; one that no page acknowledges by
    `ack_deadline` becomes an email (channel "email") or, when none can go out, "none".
    """

    CHANNEL_SOCKET = "socket"
    CHANNEL_EMAIL = "email"
    CHANNEL_NONE = "none"  # no email address, or no longer allowed or useful: nothing could be sent
    CHANNEL_CHOICES = [(CHANNEL_SOCKET, "socket"), (CHANNEL_EMAIL, "email"), (CHANNEL_NONE, "none")]

    notification_id = models.UUIDField(unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=20)
    priority = models.PositiveSmallIntegerField()
    channel = models.CharField(max_length=10, choices=CHANNEL_CHOICES)
    # When the notification was queued (the event's time); delivered_at - queued_at is its latency.
    queued_at = models.DateTimeField()
    # When a page acknowledged the push, or the email went out, or nothing could be sent (channel
    # "none"); empty while a push awaits its acknowledgement.
    delivered_at = models.DateTimeField(null=True, blank=True)
    # When it was pushed to the user's open sockets (empty when the user had none), and until when
    # a page's acknowledgement is awaited before the email fallback.
    pushed_at = models.DateTimeField(null=True, blank=True)
    ack_deadline = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # The fallback sweep's query: pushes still awaiting an acknowledgement, by deadline.
            models.Index(
                fields=["ack_deadline"],
                name="notification_awaiting_ack_idx",
                condition=models.Q(delivered_at__isnull=True),
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.notification_id} -> {self.user_id} ({self.channel})"
