"""`manage.py setup_broker [--check]`: declare the RabbitMQ topology, or compare it with the broker's.

On a cluster it goes through the first node of CELERY_BROKER_URL that answers (a cluster shares
its exchanges and queues) and names it.
"""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from rich.console import Console
from rich.table import Table

from infrastructure import health
from messaging.connection import BrokerUnavailable, broker_close, broker_connect, broker_node
from messaging.topology import EXCHANGES, declare_topology, declared_queues, topology_differences


class Command(BaseCommand):
    help = "Declare the exchanges and queues of messaging/topology.py (idempotent); --check only compares."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--check", action="store_true", help="report differences, change nothing")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args, **options) -> None:
        try:
            connection = broker_connect(settings.CELERY_BROKER_URL, connect_timeout=health.TIMEOUT_SECONDS)
        except BrokerUnavailable as error:
            url = health.redacted_url(settings.CELERY_BROKER_URL)
            raise CommandError(health.ServiceState("broker", url, False, str(error)).explain()) from error
        node = broker_node(connection)
        unavailable: list[str] = []
        try:
            differences = topology_differences(connection)
            # Missing entities are simply created; a mismatch needs a person (the queue may
            # hold messages), so then nothing is changed and every difference is reported.
            if not options["check"] and all(d.problem == "is missing" for d in differences):
                unavailable = declare_topology(connection)
                differences = []
        except Exception as error:  # a broker that goes away mid-run: one line, not a traceback
            raise CommandError(f"RabbitMQ failed during setup_broker (through {node}): {error}") from error
        finally:
            broker_close(connection)

        if options["json"]:
            self.stdout.write(
                json.dumps(
                    [
                        {"kind": d.kind, "name": d.name, "problem": d.problem, "migration": d.migration}
                        for d in differences
                    ]
                )
            )
        elif differences:
            table = Table(
                "entity", "name", "difference", "how to migrate", title="Broker topology differences"
            )
            for d in differences:
                table.add_row(d.kind, d.name, d.problem, d.migration)
            Console(file=self.stderr._out, width=160).print(table)
        if differences:
            raise CommandError(
                f"{len(differences)} difference(s) between the broker and messaging/topology.py"
            )
        if unavailable:
            raise CommandError(
                f"{'; '.join(unavailable)} (through {node}); run setup_broker again once it is back"
            )
        if not options["json"]:
            verb = "match" if options["check"] else "are declared"
            self.stdout.write(
                f"{len(EXCHANGES)} exchanges and {len(declared_queues())} queues {verb} (through {node})."
            )
