from django.contrib import admin
from django.urls import include, path

from chat import views
from monitoring import views as monitoring_views

urlpatterns = [
    path("", views.rooms, name="rooms"),
    path("rooms/<slug:slug>/", views.room, name="room"),
    path("api/rooms/<slug:slug>/messages", views.room_messages, name="room-messages"),
    path("healthz", monitoring_views.healthz, name="healthz"),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("", include("monitoring.urls")),
    path("", include("analytics.urls")),
]
