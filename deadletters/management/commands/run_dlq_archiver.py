"""`manage.py run_dlq_archiver`: the dead-letter archiver process (Procfile `dlq_archiver`)."""

import signal

from django.core.management.base import BaseCommand

from deadletters.archiver import dead_letter_archiver_run


class ArchiverStopped(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    pass


def _raise_stop(signum, frame) -> None:
    raise ArchiverStopped


class Command(BaseCommand):
    help = "Archive every message of the dead_letters queue in PostgreSQL, acking only after the commit."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--broker-url", help="RabbitMQ URL (default: CELERY_BROKER_URL)")
        parser.add_argument("--prefetch", type=int, help="unacked deliveries held at once")

    def handle(self, *args, **options) -> None:
        # Stopping anywhere is safe: an unacked delivery comes back and is archived once.
        signal.signal(signal.SIGTERM, _raise_stop)
        try:
            dead_letter_archiver_run(broker_url=options["broker_url"], prefetch=options["prefetch"])
        except (ArchiverStopped, KeyboardInterrupt):
            self.stdout.write("dead-letter archiver stopped")
