"""`manage.py loadtest`: real WebSocket clients against one web process (docs/performance.md)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import loadtest
from bench.procfile import DaphneServer, ProcessNotReady, WebTier, free_port, serving_processes

# The numbers issue 2 measures this project against (docs/performance.md).
TUTORIAL = {
    "delivered": "98.1%",
    "persisted": "0% (stores nothing)",
    "p50": "190 ms",
    "p99": "340 ms",
}
# How long stored rows may trail the clients' close before the rest count as not persisted.
PERSIST_SETTLE_SECONDS = 15.0
TARGET = {"delivered": "100%", "persisted": "100%", "p99": "< 100 ms", "sockets": "1000 on one process"}


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _positive_ints(value: str) -> list[int]:
    """One number, or a comma-separated list of them for a sweep."""
    return [_positive_int(part) for part in value.split(",")]


class Command(BaseCommand):
    help = (
        "Open rooms x clients WebSockets that each send messages at a set rate, and report delivery, "
        "persistence, latency and each serving process's CPU; or, with --connections-only N, hold N "
        "sockets."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--rooms",
            type=_positive_ints,
            default=[10],
            help="rooms; a comma-separated list sweeps them, one line per load (default 10)",
        )
        parser.add_argument(
            "--clients",
            type=_positive_ints,
            default=[10],
            help="clients per room (>= 2); a comma-separated list sweeps them (default 10)",
        )
        parser.add_argument("--messages", type=_positive_int, default=20, help="messages per client")
        parser.add_argument(
            "--rate", type=float, default=2.0, help="messages per second per client (default 2)"
        )
        target = parser.add_mutually_exclusive_group()
        target.add_argument(
            "--url",
            help="a running site: the load balancer of `make run` (http://127.0.0.1:8000) or one web process "
            "(default: start one web process)",
        )
        target.add_argument(
            "--web-processes",
            type=_positive_int,
            metavar="N",
            help="start N web processes behind the load balancer (the Procfile's lb and web), go through it",
        )
        parser.add_argument("--connections-only", type=_positive_int, metavar="N")
        parser.add_argument(
            "--hold", type=float, default=5.0, help="seconds to hold --connections-only sockets"
        )
        parser.add_argument("--json", action="store_true", help="print the results as JSON")
        parser.add_argument(
            "--delete-data", action="store_true", help="delete every loadtest- user and room, then exit"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        console = Console(stderr=options["json"])
        if options["delete_data"]:
            rooms, users = loadtest.loadtest_data_delete()
            console.print(f"Deleted {rooms} load-test rooms and {users} users (with their messages).")
            return
        loads = [(rooms, clients) for rooms in options["rooms"] for clients in options["clients"]]
        if options["connections_only"] is None:
            self._check_message_load(options)
        elif len(loads) > 1:
            raise CommandError("--connections-only takes no --rooms/--clients sweep.")
        sockets = options["connections_only"] or max(rooms * clients for rooms, clients in loads)
        # Each socket is a file descriptor here, and in the web process if it is started from here.
        loadtest.open_files_limit_raise(needed=2 * sockets + 256)

        with ExitStack() as started:
            target, serving, rss_pids = self._target(console, options, started)
            try:
                loadtest.server_check(target=target)
            except loadtest.ServerUnreachable as error:
                raise CommandError(str(error)) from None
            if options["connections_only"]:
                summary = self._connections(
                    console, target, options["connections_only"], options["hold"], rss_pids, options["json"]
                )
            elif len(loads) == 1:
                summary = self._messages(console, target, *loads[0], options, serving)
                if not options["json"]:
                    self._print_messages(console, summary)
            else:
                summary = []
                for rooms, clients in loads:
                    summary.append(self._messages(console, target, rooms, clients, options, serving))
                    if not options["json"]:
                        console.print(_load_line(summary[-1]), highlight=False, soft_wrap=True)
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))

    def _target(
        self, console: Console, options: dict[str, Any], started: ExitStack
    ) -> tuple[loadtest.Target, dict[str, int], list[int]]:
        """Where the clients connect, the local processes serving it (name -> pid: the load balancer
        and the web processes, for their CPU) and the web processes' pids (for memory).

        What it starts is stopped when `started` closes.
        """
        if options["url"]:
            target = loadtest.Target(options["url"].rstrip("/"))
            parts = urlsplit(target.http_url)
            balancer, web = (None, {})
            if parts.hostname in ("127.0.0.1", "localhost", "::1"):
                balancer, web = serving_processes(parts.port or 80)
            serving = ({"lb": balancer} if balancer else {}) | web
            return target, serving, list(web.values())
        if options["web_processes"]:
            tier = WebTier(size=options["web_processes"])
            run_dir = started.enter_context(tempfile.TemporaryDirectory(prefix="chat-lb-"))
            console.print(f"Starting {tier.size} web processes behind the load balancer ...")
            started.callback(tier.stop)
            try:
                tier.start(run_dir=Path(run_dir))
            except ProcessNotReady as error:
                raise CommandError(f"The web tier did not start: {error}.") from None
            web = {f"web{n}": server.pid for n, server in enumerate(tier.servers, 1)}
            return loadtest.Target(tier.http_url), {"lb": tier.balancer.child.pid, **web}, list(web.values())
        server = DaphneServer(port=free_port())
        console.print(f"Starting the Procfile's web process on {server.http_url} ...")
        started.callback(server.stop)
        try:
            server.start()
        except RuntimeError as error:
            raise CommandError(f"The web process did not start: {error}.") from None
        return loadtest.Target(server.http_url), {"web": server.pid}, [server.pid]

    def _check_message_load(self, options: dict[str, Any]) -> None:
        if min(options["clients"]) < 2:
            raise CommandError("--clients must be at least 2: deliveries are counted at the other clients.")
        if options["rate"] <= 0:
            raise CommandError("--rate must be above 0.")
        if options["rate"] >= settings.CHAT_RATE_PER_SECOND:
            raise CommandError(
                f"--rate must stay under the per-user limit of {settings.CHAT_RATE_PER_SECOND:g} messages/s, "
                "or the server answers rate_limited."
            )

    def _progress(self, console: Console) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )

    def _messages(
        self,
        console: Console,
        target: loadtest.Target,
        rooms: int,
        per_room: int,
        options: dict[str, Any],
        serving: dict[str, int],
    ) -> dict[str, Any]:
        users = loadtest.loadtest_users_ensure(count=rooms * per_room)
        room_slugs = [room.slug for room in loadtest.loadtest_rooms_ensure(count=rooms)]
        session_keys = loadtest.loadtest_sessions_create(users=users)
        clients = [
            loadtest.LoadClient(room=room_slugs[i // per_room], session_key=key)
            for i, key in enumerate(session_keys)
        ]
        console.print(
            f"{rooms} rooms x {per_room} clients x {options['messages']} messages "
            f"at {options['rate']:g}/s per client against {target.http_url}"
        )
        try:
            with self._progress(console) as progress:
                task = progress.add_task("deliveries", total=None)

                def advance(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                report, client_ids = asyncio.run(
                    loadtest.load_run(
                        target=target,
                        clients=clients,
                        messages=options["messages"],
                        rate=options["rate"],
                        progress=advance,
                        cpu=loadtest.CpuMeter(serving),
                    )
                )
        finally:
            # The connection opened before the clients ran may have been dropped meanwhile.
            connection.close()
            loadtest.loadtest_sessions_delete(session_keys=session_keys)
        report.persisted = loadtest.loadtest_persisted_count(
            client_ids=client_ids, settle_seconds=PERSIST_SETTLE_SECONDS
        )
        return report.summary()

    def _print_messages(self, console: Console, s: dict[str, Any]) -> None:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        table = Table(title="Chat load")
        table.add_column("")
        table.add_column("this run", justify="right")
        table.add_column("Channels tutorial", justify="right")
        table.add_column("target", justify="right")
        expected_sockets = s["rooms"] * s["clients_per_room"]
        table.add_row("connected sockets", f"{s['connected']} of {expected_sockets}", "99 of 100", "all")
        table.add_row("messages sent", str(s["sent"]), "", "")
        table.add_row("acknowledged to sender", f"{s['acked']} of {s['sent']}", "", "all")
        table.add_row(
            "delivered (to the other clients)",
            f"{s['delivered_pct']:.2f}% ({s['delivered']} of {s['expected_deliveries']})",
            TUTORIAL["delivered"],
            TARGET["delivered"],
        )
        table.add_row(
            "persisted in PostgreSQL",
            f"{s['persisted_pct']:.2f}% ({s['persisted']} of {s['sent']})",
            TUTORIAL["persisted"],
            TARGET["persisted"],
        )
        table.add_row("deliveries/s", f"{s['deliveries_per_second']:.0f}", "", "")
        table.add_row("send-to-receive p50", ms(s["latency_p50_ms"]), TUTORIAL["p50"], "")
        table.add_row("send-to-receive p99", ms(s["latency_p99_ms"]), TUTORIAL["p99"], TARGET["p99"])
        table.add_row("send-to-receive max", ms(s["latency_max_ms"]), "", "")
        table.add_row("send-to-ack p50 / p99", f"{ms(s['ack_p50_ms'])} / {ms(s['ack_p99_ms'])}", "", "")
        table.add_row("duplicate deliveries", str(s["duplicates"]), "", "0")
        table.add_row("errors", _errors(s["errors"]), "1011 close", "none")
        table.add_row("CPU while sending, % of one core", _process_cpu(s["process_cpu"]), "", "")
        table.add_row("machine", _machine(s), "2 cores", "")
        console.print(table)

    def _connections(
        self,
        console: Console,
        target: loadtest.Target,
        count: int,
        hold: float,
        rss_pids: list[int],
        as_json: bool,
    ) -> dict[str, Any]:
        users = loadtest.loadtest_users_ensure(count=count)
        (room,) = loadtest.loadtest_rooms_ensure(count=1)
        session_keys = loadtest.loadtest_sessions_create(users=users)
        clients = [loadtest.LoadClient(room=room.slug, session_key=key) for key in session_keys]
        console.print(f"{count} sockets to {room.slug} on {target.http_url}, held {hold:g} s")
        try:
            with self._progress(console) as progress:
                task = progress.add_task("connecting", total=count)
                report = asyncio.run(
                    loadtest.connections_run(
                        target=target,
                        clients=clients,
                        hold_seconds=hold,
                        rss=(lambda: _rss_sum(rss_pids)) if rss_pids else None,
                        progress=lambda done, total: progress.update(task, completed=done),
                    )
                )
        finally:
            # The connection opened before the clients ran may have been dropped meanwhile.
            connection.close()
            loadtest.loadtest_sessions_delete(session_keys=session_keys)
        summary = report.summary()
        if not as_json:
            self._print_connections(console, summary)
        return summary

    def _print_connections(self, console: Console, s: dict[str, Any]) -> None:
        def mib(value: int | None) -> str:
            return "-" if value is None else f"{value / 2**20:.1f} MiB"

        table = Table(title="Sockets held")
        table.add_column("")
        table.add_column("this run", justify="right")
        table.add_column("target", justify="right")
        table.add_row(
            "connected",
            f"{s['connected']} of {s['requested']} in {s['connect_seconds']:g} s",
            TARGET["sockets"],
        )
        table.add_row(f"still open after {s['hold_seconds']:g} s", str(s["open_after_hold"]), "all")
        table.add_row("received one broadcast", f"{s['received_broadcast']} of {s['connected']}", "all")
        table.add_row(
            "broadcast reached all in", "-" if s["broadcast_ms"] is None else f"{s['broadcast_ms']} ms", ""
        )
        table.add_row(
            "web processes' RSS before / after",
            f"{mib(s['rss_before_bytes'])} / {mib(s['rss_after_bytes'])}",
            "",
        )
        per_socket = s["rss_per_socket_bytes"]
        table.add_row("RSS per socket", "-" if per_socket is None else f"{per_socket / 1024:.0f} KiB", "")
        table.add_row("errors", _errors(s["errors"]), "none")
        table.add_row("machine", _machine(s), "")
        console.print(table)


def _load_line(s: dict[str, Any]) -> str:
    """One load of a sweep, in a line."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    return (
        f"{s['rooms']} x {s['clients_per_room']} x {s['rate_per_client']:g}/s: "
        f"delivered {s['delivered_pct']:.2f}%, stored {s['persisted_pct']:.2f}%, "
        f"p50 {ms(s['latency_p50_ms'])}, p99 {ms(s['latency_p99_ms'])}, "
        f"{s['deliveries_per_second']:,.0f} deliveries/s, errors {_errors(s['errors'])}, "
        f"CPU {_process_cpu(s['process_cpu'])}, load {s['load_average_1min']['end']:.1f}"
    )


def _rss_sum(pids: list[int]) -> int | None:
    sizes = [loadtest.process_rss_bytes(pid) for pid in pids]
    return None if None in sizes else sum(sizes)


def _process_cpu(processes: list[dict[str, Any]]) -> str:
    if not processes:
        return "- (no local web process found)"
    return ", ".join(
        f"{p['name']} {'-' if p['cpu_pct'] is None else format(p['cpu_pct'], '.0f')}%" for p in processes
    )


def _machine(s: dict[str, Any]) -> str:
    load = s["load_average_1min"]
    return f"{s['cpus']} CPUs, load average {load['start']:.1f} -> {load['end']:.1f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{label} x{count}" for label, count in sorted(errors.items())) or "none"
