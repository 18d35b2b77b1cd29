"""`manage.py dlq list|show|replay|discard`: the dead-letter archive from the shell.

    manage.py dlq list [--queue Q] [--reason R] [--task T] [--status S] [--limit N] [--json]
    manage.py dlq show ID [--json]
    manage.py dlq replay (ID ... | --all) [--queue ...] [--dry-run]
    manage.py dlq discard (ID ... | --all) [--queue ...] [--dry-run]

`--all` acts on every dead letter matching the filters (by default only status `new`).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import track
from rich.table import Table

from deadletters import selectors
from deadletters.models import DeadLetter
from deadletters.services.resolution import dead_letter_discard, dead_letter_replay


def _summary(dl: DeadLetter) -> dict[str, object]:
    return {
        "id": dl.pk,
        "origin_queue": dl.origin_queue,
        "reason": dl.reason,
        "task_name": dl.task_name,
        "task_id": dl.task_id,
        "error_class": dl.error_class,
        "error_message": dl.error_message,
        "death_count": dl.death_count,
        "first_death_at": dl.first_death_at.isoformat() if dl.first_death_at else None,
        "last_death_at": dl.last_death_at.isoformat() if dl.last_death_at else None,
        "status": dl.status,
        "replay_count": dl.replay_count,
    }


class Command(BaseCommand):
    help = "List, show, replay or discard archived dead letters."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, parser_class=CommandParser)

        def filters(p: CommandParser) -> None:
            p.add_argument("--queue", help="origin queue")
            p.add_argument("--reason", help="rejected, expired, maxlen, delivery_limit")
            p.add_argument("--task", help="task name")
            p.add_argument(
                "--status", choices=DeadLetter.Status.values, help="default: any (list), new (--all)"
            )

        listing = sub.add_parser("list", help="dead letters, newest death first")
        filters(listing)
        listing.add_argument("--limit", type=int, default=50)
        listing.add_argument("--json", action="store_true", help="machine-readable output")

        show = sub.add_parser("show", help="one dead letter in full")
        show.add_argument("id", type=int)
        show.add_argument("--json", action="store_true", help="machine-readable output")

        for name, text in (("replay", "republish to the original exchange"), ("discard", "mark discarded")):
            p = sub.add_parser(name, help=text)
            p.add_argument("ids", type=int, nargs="*")
            filters(p)
            p.add_argument("--all", action="store_true", help="every dead letter matching the filters")
            p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")

    def handle(self, *args, **options) -> None:
        self.console = Console(file=self.stdout, width=160)
        getattr(self, f"handle_{options['action']}")(options)

    def handle_list(self, options: dict) -> None:
        letters = list(
            selectors.dead_letters_matching(
                queue=options["queue"],
                reason=options["reason"],
                task=options["task"],
                status=options["status"],
            )[: options["limit"]]
        )
        if options["json"]:
            self.stdout.write(json.dumps([_summary(dl) for dl in letters], indent=2))
            return
        table = Table(title=f"Dead letters ({len(letters)} shown)")
        for column in (
            "id",
            "queue",
            "reason",
            "task",
            "error",
            "deaths",
            "first death",
            "last death",
            "status",
        ):
            table.add_column(column)
        for dl in letters:
            error = (
                f"{dl.error_class.rpartition('.')[2]}: {dl.error_message}"
                if dl.error_class
                else dl.error_message
            )
            table.add_row(
                str(dl.pk),
                dl.origin_queue,
                dl.reason,
                dl.task_name or "-",
                error[:60] or "-",
                str(dl.death_count),
                f"{dl.first_death_at:%Y-%m-%d %H:%M:%S}" if dl.first_death_at else "-",
                f"{dl.last_death_at:%Y-%m-%d %H:%M:%S}" if dl.last_death_at else "-",
                f"{dl.status} ({dl.replay_count}x)" if dl.replay_count else dl.status,
            )
        self.console.print(table)

    def handle_show(self, options: dict) -> None:
        dl = DeadLetter.objects.filter(pk=options["id"]).first()
        if dl is None:
            raise CommandError(f"no dead letter with id {options['id']}")
        detail = {
            **_summary(dl),
            "origin_exchange": dl.origin_exchange,
            "routing_key": dl.routing_key,
            "attempts": dl.attempts,
            "payload": selectors.dead_letter_payload(dl),
            "headers": dl.headers,
            "properties": dl.properties,
            "x_death": dl.x_death,
            "traceback": dl.traceback,
        }
        if options["json"]:
            self.stdout.write(json.dumps(detail, indent=2))
            return
        for key, value in detail.items():
            if isinstance(value, (dict, list)):
                self.console.print(f"[bold]{key}[/bold]:")
                self.console.print_json(json.dumps(value))
            elif key == "traceback" and value:
                self.console.print(f"[bold]{key}[/bold]:\n{value}", highlight=False, markup=False)
            else:
                self.console.print(f"[bold]{key}[/bold]: {value}", highlight=False)

    def _selection(self, options: dict):
        if options["all"] == bool(options["ids"]):
            raise CommandError(
                "give dead letter ids or --all (with optional --queue/--reason/--task/--status)"
            )
        status = options["status"] or (None if options["ids"] else DeadLetter.Status.NEW)
        return selectors.dead_letters_matching(
            queue=options["queue"],
            reason=options["reason"],
            task=options["task"],
            status=status,
            ids=options["ids"] or None,
        )

    def handle_replay(self, options: dict) -> None:
        self._act(options, "replay")

    def handle_discard(self, options: dict) -> None:
        self._act(options, "discard")

    def _act(self, options: dict, verb: str) -> None:
        letters = list(self._selection(options))
        if options["ids"]:
            missing = sorted(set(options["ids"]) - {dl.pk for dl in letters})
            if missing:
                raise CommandError(f"no dead letter with id {', '.join(map(str, missing))}")
        if options["dry_run"]:
            self.stdout.write(
                f"would {verb} {len(letters)} dead letters: {', '.join(str(dl.pk) for dl in letters)}"
            )
            return
        action = dead_letter_replay if verb == "replay" else dead_letter_discard
        done: list[int] = []
        failed: dict[int, str] = {}
        nodes: dict[str, None] = {}  # the broker nodes replays went through, in order
        # One service call per chunk keeps the progress bar moving on thousands of letters.
        chunks = [letters[i : i + 100] for i in range(0, len(letters), 100)]
        for chunk in track(chunks, description=f"{verb}ing", console=self.console, disable=len(chunks) < 2):
            result = action(dead_letters=chunk)
            done += result.done
            failed.update(result.failed)
            if result.node:
                nodes[result.node] = None
        past = "replayed" if verb == "replay" else "discarded"
        through = f" through {', '.join(nodes)}" if nodes else ""
        self.stdout.write(f"{past} {len(done)} dead letters{through}")
        if failed:
            for pk, error in failed.items():
                self.stderr.write(f"#{pk}: {error}")
            raise CommandError(f"{len(failed)} dead letters could not be {past}")
