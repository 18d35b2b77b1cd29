"""`manage.py run_relay`: the outbox relay process (Procfile `relay`)."""

import signal

from django.conf import settings
from django.core.management.base import BaseCommand

from infrastructure.metrics_server import metrics_server_start
from messaging.relay import relay_run


class Command(BaseCommand):
    help = "Publish committed outbox events to RabbitMQ (confirmed) and mark them sent; runs until stopped."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--broker-url", help="RabbitMQ URL (default: CELERY_BROKER_URL)")
        parser.add_argument("--poll-seconds", type=float, help="fallback poll when no NOTIFY arrives")
        parser.add_argument(
            "--crash-after-confirm",
            action="store_true",
            help="test hook: exit abruptly after the broker confirmed a batch, before marking it sent",
        )

    def handle(self, *args, **options) -> None:
        # Stopping mid-round is safe (the transaction rolls back, the rows are published again),
        # so SIGTERM from honcho or docker simply ends the loop wherever it is.
        signal.signal(signal.SIGTERM, _raise_stop)
        metrics_server_start(port=settings.RELAY_METRICS_PORT, name="relay")
        try:
            relay_run(
                broker_url=options["broker_url"],
                poll_seconds=options["poll_seconds"],
                crash_after_confirm=options["crash_after_confirm"],
            )
        except (RelayStopped, KeyboardInterrupt):
            self.stdout.write("relay stopped")


class RelayStopped(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    pass


def _raise_stop(signum, frame) -> None:
    raise RelayStopped
