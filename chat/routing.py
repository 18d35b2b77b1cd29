from django.urls import path

from chat.consumers import RoomConsumer
from monitoring.consumers import StaffAlertConsumer

websocket_urlpatterns = [
    path("ws/rooms/<slug:slug>/", RoomConsumer.as_asgi()),
    path("ws/alerts/", StaffAlertConsumer.as_asgi()),
]
