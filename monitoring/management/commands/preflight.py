"""`manage.py preflight`: is every service up? Creates the database when missing."""

import psycopg2
from django.core.management.base import BaseCommand, CommandError

from infrastructure import health
from infrastructure.postgres import database_create_if_missing


class Command(BaseCommand):
    help = "Check PostgreSQL, Redis and RabbitMQ, create the database if missing, explain what is down."
    requires_system_checks: list[str] = []

    def handle(self, *args, **options) -> None:
        problems = []
        try:
            if database_create_if_missing():
                self.stdout.write("Created the PostgreSQL database.")
        except psycopg2.OperationalError:
            pass  # reported below with the other services, in the same words
        for state in health.check_all():
            if not state.ok:
                problems.append(state.explain())
            elif state.degraded:
                self.stderr.write(f"Warning: {state.consequence(with_details=True)}")
        if problems:
            raise CommandError("\n".join(problems))
        self.stdout.write("PostgreSQL, Redis and RabbitMQ are reachable.")
