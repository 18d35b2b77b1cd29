"""`manage.py run_dlq_archiver`: the dead-letter archiver process (Procfile `dlq_archiver`)."""

from django.core.management.base import BaseCommand

from deadletters.archiver import dead_letter_archiver_run
from messaging.loop import LoopStopped, stop_on_sigterm


class Command(BaseCommand):
    help = "Archive every message of the dead_letters queue in PostgreSQL, acking only after the commit."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--broker-url", help="RabbitMQ URL (default: CELERY_BROKER_URL)")
        parser.add_argument("--prefetch", type=int, help="unacked deliveries held at once")

    def handle(self, *args, **options) -> None:
        # SIGTERM from honcho or docker ends the loop wherever it is (safe: messaging/loop.py).
        stop_on_sigterm()
        try:
            dead_letter_archiver_run(broker_url=options["broker_url"], prefetch=options["prefetch"])
        except (LoopStopped, KeyboardInterrupt):
            self.stdout.write("dead-letter archiver stopped")
