"""`manage.py migrate_queues [--dry-run] [--json] [--batch-size N]`: move every queue whose
arguments differ from messaging/topology.py's onto them, keeping its messages
(messaging/queue_migration.py; docs/scaling.md, "Changing the type")."""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from infrastructure import health
from messaging.connection import BrokerUnavailable, broker_connection
from messaging.queue_migration import (
    BATCH_SIZE,
    QueueMigrationError,
    QueueMigrationPlan,
    QueueMigrationResult,
    queue_migration_plans,
    queues_migrate,
)


def _arguments(wanted: dict[str, object]) -> str:
    return ", ".join(f"{name}={value}" for name, value in wanted.items()) or "none"


class Command(BaseCommand):
    help = (
        "Move every queue whose arguments differ from messaging/topology.py's (setup_broker --check) "
        "onto them, keeping its messages; consumers must be stopped, publishers may go on."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--batch-size",
            type=int,
            default=BATCH_SIZE,
            help=f"messages per confirmed round (default {BATCH_SIZE})",
        )

    def handle(self, *args, **options) -> None:
        state = health.check_broker()
        if not state.ok:
            raise CommandError(state.explain())
        self.console = Console(file=self.stdout, width=160)
        self.progress_console = Console(file=self.stderr._out, width=160)
        try:
            if options["dry_run"]:
                with broker_connection(settings.CELERY_BROKER_URL) as connection:
                    self.show_plans(queue_migration_plans(connection), as_json=options["json"])
                return
            results = self.migrate(batch_size=options["batch_size"])
        except QueueMigrationError as error:
            raise CommandError(str(error)) from error
        except BrokerUnavailable as error:
            raise CommandError(
                f"RabbitMQ failed during migrate_queues ({error}); no message is lost: run it again to finish"
            ) from error
        self.show_results(results, as_json=options["json"])

    def migrate(self, *, batch_size: int) -> list[QueueMigrationResult]:
        tasks: dict[tuple[str, str], TaskID] = {}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.progress_console,
        ) as progress:

            def on_step(queue: str, text: str) -> None:
                progress.console.print(f"{queue}: {text}", highlight=False)

            def on_moved(source: str, destination: str, moved: int, total: int) -> None:
                key = (source, destination)
                if key not in tasks:
                    tasks[key] = progress.add_task(f"{source} -> {destination}", total=total)
                progress.update(tasks[key], completed=moved, total=total)

            return queues_migrate(
                broker_url=settings.CELERY_BROKER_URL,
                batch_size=batch_size,
                on_step=on_step,
                on_moved=on_moved,
            )

    def show_plans(self, plans: list[QueueMigrationPlan], *, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps([plan.as_dict() for plan in plans], indent=2))
            return
        if not plans:
            self.stdout.write(
                "Every queue has the arguments messaging/topology.py wants: nothing to migrate."
            )
            return
        table = Table("queue", "now", "wanted arguments", "messages", "steps", title="Queue migration plan")
        for plan in plans:
            now = plan.difference or f"an earlier run stopped; {plan.held} messages in {plan.holding}"
            table.add_row(
                plan.queue,
                now,
                _arguments(plan.wanted),
                str(plan.messages + plan.held),
                "\n".join(f"{i}. {step}" for i, step in enumerate(plan.steps, 1)),
            )
        self.console.print(table)
        busy = {name: n for plan in plans for name, n in plan.consumers.items()}
        if busy:
            self.stdout.write(
                "Consumers to stop first: " + ", ".join(f"{name} ({n})" for name, n in busy.items())
            )

    def show_results(self, results: list[QueueMigrationResult], *, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps([vars(result) for result in results], indent=2))
            return
        if not results:
            self.stdout.write(
                "Every queue has the arguments messaging/topology.py wants: nothing to migrate."
            )
            return
        table = Table("queue", "arguments now", "moved out", "moved back", "seconds", title="Migrated queues")
        for result in results:
            table.add_row(
                result.queue,
                _arguments(result.wanted),
                str(result.moved_out),
                str(result.moved_back),
                f"{result.seconds:.1f}",
            )
        self.console.print(table)
        self.stdout.write(
            f"{len(results)} queues migrated; `manage.py setup_broker --check` compares the rest."
        )
