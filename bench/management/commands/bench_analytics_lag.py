"""`manage.py bench_analytics_lag`: lag from message stored to counted, at a sustained rate."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import analytics_lag

TARGET_P99_SECONDS = 2.0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class Command(BaseCommand):
    help = (
        "Store chat messages through chat.services.message_create at --rate per second for --seconds, "
        "with the relay and analytics workers running, and report p50/p99 lag from stored to counted. "
        "Starts the Procfile's relay and worker itself; with --use-running it relies on processes "
        "already running on the same database and broker (`make run`)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rate", type=float, default=500.0, help="messages per second (default 500)")
        parser.add_argument("--seconds", type=float, default=60.0, help="how long to send (default 60)")
        parser.add_argument(
            "--processes", type=int, default=2, help="sending processes (default 2; the GIL caps one)"
        )
        parser.add_argument("--threads", type=int, default=6, help="sending threads per process (default 6)")
        parser.add_argument("--rooms", type=int, default=20, help="rooms the messages spread over")
        parser.add_argument("--users", type=int, default=50, help="authors the messages spread over")
        parser.add_argument(
            "--workers", type=int, default=1, help="Procfile `worker` processes to start (default 1)"
        )
        parser.add_argument(
            "--use-running", action="store_true", help="do not start a relay and workers; use running ones"
        )
        parser.add_argument(
            "--drain-timeout", type=float, default=60.0, help="seconds to wait for the last counts"
        )
        parser.add_argument(
            "--burst",
            type=int,
            metavar="N",
            help="instead of chatting: write N outbox events at once and time how fast relay and "
            "workers drain them (the pipeline's capacity, without the cost of storing messages)",
        )
        parser.add_argument(
            "--events-only",
            action="store_true",
            help="write synthetic events at --rate for --seconds instead of storing chat messages: the "
            "pipeline's lag at that rate, without the CPU that generating real messages costs",
        )
        parser.add_argument("--json", action="store_true", help="print the results as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rate"] <= 0 or options["seconds"] <= 0 or options["threads"] < 1:
            raise CommandError("--rate and --seconds must be positive and --threads at least 1")
        console = Console(stderr=options["json"])
        # A SIGTERM (timeout, Ctrl-C from a supervisor) must still stop the relay and workers it started.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        rooms, users = analytics_lag.bench_rooms_and_users(
            rooms=max(options["rooms"], 1), users=max(options["users"], 1)
        )
        try:
            if options["use_running"]:
                result, counted, total_seconds = self._run(console, options, rooms, users)
            else:
                with analytics_lag.pipeline_processes(workers=max(options["workers"], 1)) as log_dir:
                    console.print(f"relay and {options['workers']} worker(s) started; logs in {log_dir}")
                    result, counted, total_seconds = self._run(console, options, rooms, users)
        except analytics_lag.BenchError as error:
            raise CommandError(str(error)) from None
        if counted < len(result.message_ids):
            raise CommandError(
                f"only {counted} of {len(result.message_ids)} messages were counted within "
                f"{options['drain_timeout']:.0f}s; do a relay and a worker run on this database and broker?"
            )
        lag = analytics_lag.lag_of(result.message_ids)
        report = {
            "mode": "burst" if options["burst"] else "events" if options["events_only"] else "chat",
            "messages": len(result.message_ids),
            "counted": counted,
            # From the first message stored (or event written) to the last one counted.
            "counted_per_second": round(len(result.message_ids) / total_seconds, 1),
            "requested_rate": options["rate"],
            "achieved_rate": round(result.rate, 1),
            "seconds": round(result.seconds, 1),
            "processes": options["processes"],
            "threads": options["threads"],
            "rooms": len(rooms),
            "workers": "running" if options["use_running"] else options["workers"],
            "p50_seconds": round(lag.p50_seconds, 3),
            "p99_seconds": round(lag.p99_seconds, 3),
            "max_seconds": round(lag.max_seconds, 3),
            "target_p99_seconds": TARGET_P99_SECONDS,
            "meets_target": lag.p99_seconds < TARGET_P99_SECONDS,
        }
        if options["json"]:
            self.stdout.write(json.dumps(report))
            return
        table = Table(title="Analytics lag: message stored -> counted")
        table.add_column("")
        table.add_column("measured", justify="right")
        table.add_column("target", justify="right")
        table.add_row("messages" if not options["burst"] else "events (burst)", str(report["messages"]), "")
        table.add_row("counted per second, end to end", f"{report['counted_per_second']}", "")
        if options["burst"]:
            table.add_row("events written per second", f"{report['achieved_rate']}", "")
        else:
            table.add_row("rate (msg/s)", f"{report['achieved_rate']} of {report['requested_rate']:g}", "500")
        table.add_row("p50 lag", f"{report['p50_seconds'] * 1000:.0f} ms", "")
        table.add_row("p99 lag", f"{report['p99_seconds'] * 1000:.0f} ms", f"< {TARGET_P99_SECONDS:g} s")
        table.add_row("max lag", f"{report['max_seconds'] * 1000:.0f} ms", "")
        console.print(table)
        console.print("p99 within target" if report["meets_target"] else "p99 OVER target")

    def _run(
        self, console: Console, options: dict[str, Any], rooms, users
    ) -> tuple[analytics_lag.SendResult, int, float]:
        total = int(options["rate"] * options["seconds"])
        started = time.monotonic()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            if options["burst"]:
                sending = progress.add_task("events written", total=options["burst"])
                ids = analytics_lag.burst_events_store(count=options["burst"], rooms=rooms, users=users)
                result = analytics_lag.SendResult(message_ids=ids, seconds=time.monotonic() - started)
                progress.update(sending, completed=len(ids))
            elif options["events_only"]:
                sending = progress.add_task("events written", total=total)
                result = analytics_lag.events_store_at_rate(
                    rate=options["rate"], seconds=options["seconds"], rooms=rooms, users=users
                )
                progress.update(sending, completed=len(result.message_ids))
            else:
                sending = progress.add_task("stored", total=total)
                result = analytics_lag.messages_send_from_processes(
                    rate=options["rate"],
                    seconds=options["seconds"],
                    processes=max(options["processes"], 1),
                    threads=options["threads"],
                    rooms=rooms,
                    users=users,
                    on_progress=lambda n: progress.update(sending, completed=n),
                )
            counting = progress.add_task("counted", total=len(result.message_ids))
            counted = analytics_lag.wait_until_counted(
                message_ids=result.message_ids,
                timeout=options["drain_timeout"],
                on_progress=lambda n: progress.update(counting, completed=n),
            )
        return result, counted, time.monotonic() - started
