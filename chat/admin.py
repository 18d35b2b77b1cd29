from django.contrib import admin

from chat.models import Message, NotificationDelivery, Room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_private", "last_seq", "created_at"]
    search_fields = ["slug", "name"]
    filter_horizontal = ["members"]
    # Only message_create advances it, under the room's row lock: an edit here would reuse or skip
    # sequence numbers, and clients would see a gap that never fills or miss messages.
    readonly_fields = ["last_seq"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "room", "author", "seq", "created_at"]
    list_filter = ["room"]
    list_select_related = ["room", "author"]
    raw_id_fields = ["author"]
    readonly_fields = ["room", "author", "seq", "client_id", "created_at"]


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(admin.ModelAdmin):
    """The notifier's ledger, read-only: what was delivered to whom, how and how late."""

    list_display = [
        "notification_id",
        "kind",
        "user",
        "channel",
        "priority",
        "queued_at",
        "pushed_at",
        "delivered_at",
    ]
    list_filter = ["kind", "channel", "priority"]
    list_select_related = ["user"]
    raw_id_fields = ["user", "message"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
