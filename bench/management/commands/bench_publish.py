"""`manage.py bench_publish`: seed lesson's unconfirmed publish loop vs the outbox relay's confirmed path."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.table import Table

from bench.publish import BenchmarkError, benchmark_publish
from infrastructure import health

# Issue 3's anchors for 10,000 persistent messages on this machine kind (docs/performance.md).
ANCHORS = [
    ("seed loop: pika basic_publish, no confirms", 0.45),
    ("pika, per-message confirms", 2.4),
    ("Celery apply_async", 3.1),
    ("kombu, confirm_publish", 7.4),
]
TARGET_RATIO = 1.0


class Command(BaseCommand):
    help = (
        "Time 10,000 persistent publishes: the seed's pika loop (no confirms) vs outbox -> relay "
        "(confirmed) on CELERY_BROKER_URL's broker, e.g. a cluster's quorum queues "
        "(BROKER_QUEUE_TYPE=quorum) against the single node of --baseline-url."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=10_000)
        parser.add_argument("--repeat", type=int, default=3, help="runs of each path; medians are shown")
        parser.add_argument(
            "--baseline-url",
            metavar="URL",
            help="the broker the seed loop publishes to, in a queue of its own deleted afterwards "
            "(default: the outbox path's own vhost on CELERY_BROKER_URL), e.g. the single node "
            "amqp://guest:guest@localhost:5672// beside a cluster",
        )
        parser.add_argument("--json", action="store_true", help="print the results as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["count"] < 1 or options["repeat"] < 1:
            raise CommandError("--count and --repeat must be at least 1")
        # pika logs every connection step at INFO; the table is the output.
        logging.getLogger("pika").setLevel(logging.WARNING)
        state = health.check_broker()
        if not state.ok:
            raise CommandError(state.explain())
        console = Console()
        try:
            with console.status(f"publishing {options['count']:,} messages both ways..."):
                timings = benchmark_publish(
                    count=options["count"], repeat=options["repeat"], baseline_url=options["baseline_url"]
                )
        except BenchmarkError as error:
            raise CommandError(str(error)) from error

        if options["json"]:
            self.stdout.write(json.dumps({**asdict(timings), "ratio": round(timings.ratio, 3)}))
            return
        table = Table(
            title=f"Publishing {timings.count:,} persistent messages (median of {timings.repeat} runs)"
        )
        table.add_column("path")
        table.add_column("confirmed")
        table.add_column("seconds", justify="right")
        table.add_column("runs (s)", justify="right")
        table.add_column("messages/s", justify="right")
        table.add_column("x seed loop", justify="right")
        table.add_row(
            "seed loop (measured): pika basic_publish",
            "no",
            f"{timings.seed_seconds:.3f}",
            _spread(timings.seed_runs),
            f"{timings.count / timings.seed_seconds:,.0f}",
            "1.00",
        )
        table.add_row(
            f"outbox -> relay (measured): {timings.outbox_messages} task messages",
            "yes",
            f"{timings.outbox_seconds:.3f}",
            _spread(timings.outbox_runs),
            f"{timings.count / timings.outbox_seconds:,.0f}",
            f"[bold]{timings.ratio:.2f}[/bold]",
        )
        table.add_section()
        for name, seconds in ANCHORS:
            table.add_row(
                f"{name} (issue anchor)", "", f"{seconds:.2f}", "", "", f"{seconds / ANCHORS[0][1]:.2f}"
            )
        console.print(table)
        runs = timings.count * timings.repeat
        console.print(
            f"seed loop: {timings.seed_queued:,} of {runs:,} messages queued, none confirmed, "
            f"in a classic queue on {timings.seed_broker}"
        )
        console.print(
            f"outbox -> relay: {timings.outbox_confirmed:,} of {runs:,} events confirmed, "
            f"{timings.outbox_queued:,} task messages queued, in {timings.outbox_queue_type} queues "
            f"on {timings.outbox_broker}"
        )
        verdict = "meets" if timings.ratio <= TARGET_RATIO else "misses"
        console.print(f"The confirmed outbox path {verdict} the target of {TARGET_RATIO:.1f}x the seed loop.")


def _spread(runs: tuple[float, ...]) -> str:
    """Every run's seconds, lowest to highest: how far the machine's noise moved them."""
    return " ".join(f"{seconds:.2f}" for seconds in sorted(runs))
