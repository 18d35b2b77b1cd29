from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "chatproject.monitoring"
    label = "monitoring"
    verbose_name = "Monitoring"
