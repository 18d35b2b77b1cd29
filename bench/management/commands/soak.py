"""`manage.py soak`: mixed traffic against the running processes, sampling them (docs/performance.md)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import loadtest, soak


def _positive_minutes(value: str) -> float:
    minutes = float(value)
    if minutes <= 0:
        raise ValueError(value)
    return minutes


def _named_pid(value: str) -> tuple[str, int]:
    name, _, pid = value.partition("=")
    if name not in soak.PROCESS_SIGNATURES or not pid.isdigit():
        raise ValueError(value)
    return name, int(pid)


class Command(BaseCommand):
    help = (
        "Run page views, history API calls, logins, sockets that send, drop and reconnect, and mentions "
        "against the running chat for --minutes, sampling every process's PostgreSQL connections, memory, "
        "file descriptors and threads, Redis, the queues and the outbox; then check that every stored "
        "message was counted exactly once. Exits 1 when a figure grows or a check fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--minutes", type=_positive_minutes, default=30.0, help="how long (default 30)")
        parser.add_argument(
            "--url", default="http://127.0.0.1:8000", help="the web process (default http://127.0.0.1:8000)"
        )
        parser.add_argument(
            "--pid",
            type=_named_pid,
            action="append",
            default=[],
            metavar="NAME=PID",
            help="sample this process instead of finding it (web, worker, relay, ...); repeatable",
        )
        parser.add_argument("--json", action="store_true", help="print the results as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        console = Console(stderr=options["json"])
        target = loadtest.Target(options["url"].rstrip("/"))
        try:
            loadtest.server_check(target=target)
        except loadtest.ServerUnreachable as error:
            raise CommandError(str(error)) from None
        processes = soak.chat_processes_find(web_port=soak.web_port(target), given=dict(options["pid"]))
        if not any(p.name == "web" for p in processes):
            raise CommandError(
                f"No web process serving {target.http_url} with this database was found on this machine; "
                "pass --pid web=PID."
            )
        console.print(
            f"Soak for {options['minutes']:g} min against {target.http_url}; sampling "
            + ", ".join(f"{p.name} ({p.pid})" for p in processes)
        )
        loadtest.open_files_limit_raise(needed=4 * soak.SOCKET_CLIENTS + 256)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("starting", total=options["minutes"] * 60)

            def show(elapsed: float, total: float, line: str) -> None:
                progress.update(task, completed=elapsed, description=line)

            report = soak.soak_run(
                target=target, processes=processes, minutes=options["minutes"], progress=show
            )
        if options["json"]:
            self.stdout.write(json.dumps(report.summary(), indent=2))
        else:
            self._print(console, report)
        if not report.ok:
            raise CommandError(self._failure(report))

    def _print(self, console: Console, report: soak.SoakReport) -> None:
        table = Table(title=f"{report.minutes:g} min, {report.samples} samples")
        for column in ("figure", "start", "end", "max", "verdict"):
            table.add_column(column, justify="left" if column == "figure" else "right")
        for series in report.series.values():
            row = series.summary()
            unit = f" {row['unit']}" if row["unit"] else ""
            name = row["name"] + ("" if row["decides"] else " (info)")
            table.add_row(
                name,
                f"{row['start']:g}{unit}",
                f"{row['end']:g}{unit}",
                f"{row['max']:g}{unit}",
                row["verdict"],
            )
        console.print(table)
        console.print("Traffic: " + ", ".join(f"{k} {v}" for k, v in sorted(report.traffic.items())))
        if report.errors:
            console.print("Errors: " + ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())))
        console.print(
            f"Stored {report.stored} messages; counted once {report.counted_once}, not counted "
            f"{report.not_counted}, twice or more {report.counted_twice}; room counts grew by "
            f"{report.aggregate_delta}. Pending after {report.drain_seconds:.0f} s of draining: "
            + ", ".join(f"{k} {v}" for k, v in report.pending_at_end.items())
        )

    def _failure(self, report: soak.SoakReport) -> str:
        problems = []
        if report.growing:
            problems.append("growing: " + ", ".join(report.growing))
        if not report.counted_exactly_once:
            problems.append("messages not counted exactly once")
        pending = [f"{k} {v}" for k, v in report.pending_at_end.items() if v]
        if pending:
            problems.append("still pending: " + ", ".join(pending))
        return "Soak failed: " + "; ".join(problems) + "."
