from django.apps import AppConfig


class DeadLettersConfig(AppConfig):
    name = "deadletters"
    label = "deadletters"
    verbose_name = "Dead letters"

    def ready(self) -> None:
        # Celery workers run django.setup(), so this connects the failure hooks in every worker
        # (and harmlessly in web processes, where no task runs).
        from deadletters import worker_hooks

        worker_hooks.connect()
