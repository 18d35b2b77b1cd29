from django.urls import path

from chatproject.monitoring import views

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
]
