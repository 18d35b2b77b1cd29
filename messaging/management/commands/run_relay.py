"""`manage.py run_relay`: the outbox relay process (Procfile `relay`)."""

from django.conf import settings
from django.core.management.base import BaseCommand

from infrastructure.metrics_server import metrics_server_start
from messaging.loop import LoopStopped, stop_on_sigterm
from messaging.relay import relay_run


class Command(BaseCommand):
    help = "Publish committed outbox events to RabbitMQ (confirmed) and mark them sent; runs until stopped."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--broker-url", help="RabbitMQ URL (default: CELERY_BROKER_URL)")
        parser.add_argument("--poll-seconds", type=float, help="fallback poll when no NOTIFY arrives")

    def handle(self, *args, **options) -> None:
        # SIGTERM from honcho or docker ends the loop wherever it is (safe: messaging/loop.py).
        stop_on_sigterm()
        metrics_server_start(port=settings.RELAY_METRICS_PORT, name="relay")
        try:
            relay_run(broker_url=options["broker_url"], poll_seconds=options["poll_seconds"])
        except (LoopStopped, KeyboardInterrupt):
            self.stdout.write("relay stopped")
