from django.urls import path

from monitoring.consumers import StaffAlertConsumer

websocket_urlpatterns = [
    path("ws/alerts/", StaffAlertConsumer.as_asgi()),
]
