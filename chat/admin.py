from django.contrib import admin

from chat.models import Message, Room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_private", "last_seq", "created_at"]
    search_fields = ["slug", "name"]
    filter_horizontal = ["members"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "room", "author", "seq", "created_at"]
    list_filter = ["room"]
    list_select_related = ["room", "author"]
    raw_id_fields = ["author"]
    readonly_fields = ["room", "author", "seq", "client_id", "created_at"]
