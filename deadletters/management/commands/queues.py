"""`manage.py queues [--json]`: every queue of the topology with its depth, consumers and DLX settings,
where it lives on a cluster, and which node (management API or AMQP) answered."""

import json

from django.core.management.base import BaseCommand, CommandError
from rich.console import Console
from rich.table import Table

from deadletters.selectors import queue_statuses


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}/s"
    return str(value)


class Command(BaseCommand):
    help = "Show each queue of messaging/topology.py: ready, unacked, consumers, dead-letter settings."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args, **options) -> None:
        statuses = queue_statuses()
        if all(s.source.startswith("unreachable") for s in statuses):
            raise CommandError(f"RabbitMQ is unreachable: {statuses[0].source.removeprefix('unreachable: ')}")
        if options["json"]:
            self.stdout.write(json.dumps([status.as_dict() for status in statuses], indent=2))
            return
        table = Table(title="RabbitMQ queues")
        for column in ("queue", "ready", "unacked", "consumers", "dead-letter exchange", "ttl / max-length",
                       "publish", "deliver", "ack", "type", "leader", "members up", "source"):  # fmt: skip
            table.add_column(column)
        for s in statuses:
            limits = " / ".join(_cell(v) for v in (s.message_ttl, s.max_length))
            if s.overflow:
                limits += f" ({s.overflow})"
            table.add_row(
                s.name,
                _cell(s.messages_ready),
                _cell(s.messages_unacked),
                _cell(s.consumers),
                _cell(s.dead_letter_exchange),
                limits,
                _cell(s.publish_rate),
                _cell(s.deliver_rate),
                _cell(s.ack_rate),
                _cell(s.queue_type),
                _cell(s.leader),
                f"{len(s.online or [])}/{len(s.members)}" if s.members else "-",
                s.source,
            )
        Console(file=self.stdout, width=200).print(table)
        # Which node answered: a cluster's first that does, management API or AMQP.
        self.stdout.write("answered by " + ", ".join(dict.fromkeys(s.via for s in statuses if s.via)))
