from django.urls import path

from analytics import views

urlpatterns = [
    path("analytics/", views.dashboard, name="analytics"),
    path("api/analytics/rooms/<slug:slug>/", views.room_analytics, name="analytics-room"),
]
