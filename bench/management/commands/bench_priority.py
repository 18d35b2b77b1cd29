"""`manage.py bench_priority`: VIP vs normal notification latency while a 10,000-task backlog drains."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.priority import BenchmarkError, benchmark_priority
from infrastructure import health

# Issue 4's target: a VIP's notification is not held up by the backlog.
TARGET_VIP_P99_SECONDS = 1.0


class Command(BaseCommand):
    help = "Queue a backlog of normal notification tasks, send VIP ones while it drains, print latencies."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--backlog", type=int, default=10_000, help="normal tasks queued first")
        parser.add_argument("--vip", type=int, default=50, help="VIP tasks sent while the backlog drains")
        parser.add_argument("--vip-interval", type=float, default=0.2, help="seconds between VIP tasks")
        parser.add_argument("--timeout", type=float, default=900.0, help="give up draining after this long")
        parser.add_argument("--json", action="store_true", help="print the results as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["backlog"] < 2 or options["vip"] < 2:
            raise CommandError("--backlog and --vip must be at least 2 (percentiles need samples)")
        logging.getLogger("messaging.relay").setLevel(logging.WARNING)
        state = health.check_broker()
        if not state.ok:
            raise CommandError(state.explain())
        console = Console(stderr=True)
        try:
            with Progress(console=console, transient=True) as bar:
                tasks: dict[str, Any] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done)

                result = benchmark_priority(
                    backlog=options["backlog"],
                    vip_count=options["vip"],
                    vip_interval=options["vip_interval"],
                    timeout=options["timeout"],
                    progress=progress,
                )
        except BenchmarkError as error:
            raise CommandError(str(error)) from error

        met = result.vip.p99 < TARGET_VIP_P99_SECONDS
        if options["json"]:
            self.stdout.write(
                json.dumps({**asdict(result), "target_vip_p99": TARGET_VIP_P99_SECONDS, "met": met})
            )
        else:
            self._print_table(result, met)
        if not met:
            raise CommandError(f"VIP p99 {result.vip.p99:.3f}s misses the {TARGET_VIP_P99_SECONDS}s target")

    def _print_table(self, result: Any, met: bool) -> None:
        low, high = result.backlog_at_vip_sends
        table = Table(
            title=(
                f"Notification latency, queued -> delivered: backlog of {result.backlog:,} normal tasks, "
                f"{result.vip.count} VIP sent while {low:,}-{high:,} were still queued"
            )
        )
        for column in ("tasks", "count", "p50 s", "p99 s", "max s", "target"):
            table.add_column(column, justify="left" if column in ("tasks", "target") else "right")
        verdict = "[green]met[/green]" if met else "[red]missed[/red]"
        table.add_row(
            "VIP (priority high)",
            str(result.vip.count),
            f"{result.vip.p50:.3f}",
            f"[bold]{result.vip.p99:.3f}[/bold]",
            f"{result.vip.max:.3f}",
            f"p99 < {TARGET_VIP_P99_SECONDS:g} s: {verdict}",
        )
        table.add_row(
            "normal (priority low)",
            str(result.normal.count),
            f"{result.normal.p50:.3f}",
            f"{result.normal.p99:.3f}",
            f"{result.normal.max:.3f}",
            "-",
        )
        Console().print(table)
        rate = (result.vip.count + result.normal.count) / result.drain_seconds if result.drain_seconds else 0
        self.stdout.write(f"The notifier drained {rate:,.0f} tasks/s (one process, prefetch 1).")
