"""`manage.py soak`: mixed traffic against the running processes, sampling them (docs/performance.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import loadtest, soak

# Without a terminal (output to a file, CI), a plain progress line this often, and a table this
# wide: rich would otherwise assume 80 columns and wrap every row.
PLAIN_PROGRESS_SECONDS = 10.0
PLAIN_WIDTH = 120


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


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:g} {unit}" if unit else f"{value:g}"


def _minutes(minutes: float) -> str:
    return f"{minutes:g} minute" + ("" if minutes == 1 else "s")


class Command(BaseCommand):
    help = (
        "Run page views, history API calls, logins, sockets that send, drop and reconnect, and mentions "
        "against the running chat for --minutes, sampling every process's PostgreSQL connections, memory, "
        "file descriptors and threads, Redis, the queues and the outbox; then check that every stored "
        "message was counted exactly once. Ends with a one-line verdict; exits 1 when a figure grows, "
        "a process exceeds its connection bound, or a check fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--minutes",
            type=_positive_minutes,
            default=30.0,
            help=f"how long (default 30, at least {soak.MIN_MINUTES:g})",
        )
        parser.add_argument(
            "--url",
            default="http://127.0.0.1:8000",
            help="the site: make run's load balancer (default http://127.0.0.1:8000) or one web process",
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
        if not console.is_terminal:
            console.width = PLAIN_WIDTH
        minutes = options["minutes"]
        try:
            soak.soak_minutes_check(minutes=minutes)
        except soak.SoakError as error:
            raise CommandError(str(error)) from None
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
            f"Soak for {minutes:g} min against {target.http_url}; sampling "
            + ", ".join(f"{p.name} ({p.pid})" for p in processes),
            soft_wrap=True,
        )
        loadtest.open_files_limit_raise(needed=4 * soak.SOCKET_CLIENTS + 256)
        with self._progress(console, total=minutes * 60) as show:
            try:
                report = soak.soak_run(target=target, processes=processes, minutes=minutes, progress=show)
            except soak.SoakError as error:
                raise CommandError(str(error)) from None
        if options["json"]:
            self.stdout.write(json.dumps(report.summary(), indent=2))
        else:
            self._print(console, report)
        if not report.ok:
            raise CommandError(self._failure(report))
        console.print(
            f"soak passed: nothing grew over {_minutes(minutes)}; {report.stored} stored messages "
            "counted exactly once",
            soft_wrap=True,
        )

    @contextmanager
    def _progress(self, console: Console, *, total: float) -> Iterator[soak.ProgressCallback]:
        """A bar redrawn in place on a terminal; elsewhere a plain line every PLAIN_PROGRESS_SECONDS."""
        if not console.is_terminal:
            last_shown = [-PLAIN_PROGRESS_SECONDS]

            def line(elapsed: float, total: float, text: str) -> None:
                now = time.monotonic()
                if now - last_shown[0] >= PLAIN_PROGRESS_SECONDS or elapsed >= total:
                    last_shown[0] = now
                    console.print(f"{elapsed:4.0f}/{total:.0f} s  {text}", soft_wrap=True)

            yield line
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("starting", total=total)

            def bar(elapsed: float, total: float, text: str) -> None:
                progress.update(task, completed=elapsed, description=text)

            yield bar

    def _print(self, console: Console, report: soak.SoakReport) -> None:
        table = Table(title=f"{report.minutes:g} min, {report.samples} samples")
        columns = ("figure", "before traffic", "baseline", "end", "max", "bound", "verdict")
        for column in columns:
            table.add_column(column, justify="left" if column == "figure" else "right")
        for series in report.series.values():
            row = series.summary()
            name = row["name"] + ("" if row["decides"] else " (info)")
            table.add_row(
                name,
                *(_shown(row[key], row["unit"]) for key in ("before_traffic", "baseline", "end", "max")),
                _shown(row["bound"], ""),
                row["verdict"],
            )
        console.print(table)
        console.print(
            "baseline: what the verdict compares the rest of the run with, the warm-up's maximum (the first "
            "third of the samples; memory: the middle third's). bound: the process's connection bound "
            "(docs/architecture.md), never to be exceeded.",
            soft_wrap=True,
        )
        traffic = report.traffic
        console.print("Traffic: " + ", ".join(f"{k} {v}" for k, v in sorted(traffic.items())), soft_wrap=True)
        if report.errors:
            console.print(
                "Errors: " + ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())), soft_wrap=True
            )
        console.print(
            f"Messages: sent {traffic['messages sent']}; acknowledged (came back to their sender) "
            f"{traffic['messages acknowledged']}, refused (an error frame, e.g. the rate limit) "
            f"{traffic['messages refused']}, unacknowledged (their socket dropped first) "
            f"{traffic['messages unacknowledged']}, of which stored anyway {report.unacknowledged_stored}. "
            f"Stored {report.stored} (acknowledged + stored anyway: "
            f"{traffic['messages acknowledged'] + report.unacknowledged_stored}); counted once "
            f"{report.counted_once}, not counted {report.not_counted}, twice or more {report.counted_twice}; "
            f"room counts grew by {report.aggregate_delta}. Pending after {report.drain_seconds:.0f} s of "
            "draining: " + ", ".join(f"{k} {v}" for k, v in report.pending_at_end.items()),
            soft_wrap=True,
        )
        console.print(
            f"Mention notifications: pushed to the soak's sockets {traffic['notifications pushed']}, "
            f"acknowledged by them {traffic['notifications acknowledged']}; by outcome: "
            + ", ".join(f"{k} {v}" for k, v in report.notifications.items()),
            soft_wrap=True,
        )

    def _failure(self, report: soak.SoakReport) -> str:
        problems = []
        over = [s.name for s in report.series.values() if s.decides and s.verdict() == "over its bound"]
        growing = [name for name in report.growing if name not in over]
        if over:
            problems.append("over their connection bound: " + ", ".join(over))
        if growing:
            problems.append("growing: " + ", ".join(growing))
        if not report.counted_exactly_once:
            problems.append("messages not counted exactly once")
        pending = [f"{k} {v}" for k, v in report.pending_at_end.items() if v]
        if pending:
            problems.append("still pending: " + ", ".join(pending))
        return f"soak FAILED over {_minutes(report.minutes)}: " + "; ".join(problems) + "."
