"""`manage.py check_dlq`: a Nagios/cron-style probe of the dead-letter backlog.

Prints one status line and exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (database unreadable).
It only reads: notifying is the periodic check's job, so a probe never sends a second alert.
"""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError

from monitoring.selectors import dead_letter_backlog
from monitoring.services import dead_letter_finding

UNKNOWN = 3


class Command(BaseCommand):
    help = "Check unresolved dead letters against thresholds; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--warning", type=int, help="unresolved count for WARNING (default DLQ_WARNING_COUNT)"
        )
        parser.add_argument(
            "--critical", type=int, help="unresolved count for CRITICAL (default DLQ_CRITICAL_COUNT)"
        )
        parser.add_argument("--warning-age", type=float, help="oldest age in seconds for WARNING")
        parser.add_argument("--critical-age", type=float, help="oldest age in seconds for CRITICAL")
        parser.add_argument("--json", action="store_true", help="print a JSON object instead of the line")

    def handle(self, *args, **options) -> None:
        try:
            backlog = dead_letter_backlog()
        except DatabaseError as error:
            self._finish(
                UNKNOWN,
                f"DLQ UNKNOWN - database not readable: {str(error).strip().splitlines()[0]}",
                {},
                json_output=options["json"],
            )
            return
        if backlog is None:
            self._finish(
                UNKNOWN, "DLQ UNKNOWN - the deadletters app is not installed", {}, json_output=options["json"]
            )
            return
        finding = dead_letter_finding(
            backlog=backlog,
            warning_count=options["warning"],
            critical_count=options["critical"],
            warning_age_seconds=options["warning_age"],
            critical_age_seconds=options["critical_age"],
        )
        # Nagios performance data after the `|`: value;warn;crit.
        line = (
            f"DLQ {finding.level.label} - {finding.summary} | unresolved={backlog.unresolved} "
            f"oldest_age={backlog.oldest_unresolved_age_seconds:.0f}s"
        )
        data = {
            "status": finding.level.label,
            "unresolved": backlog.unresolved,
            "oldest_age_seconds": round(backlog.oldest_unresolved_age_seconds, 1),
            "by_status": backlog.by_status,
        }
        self._finish(int(finding.level), line, data, json_output=options["json"])

    def _finish(self, code: int, line: str, data: dict, json_output: bool = False) -> None:
        if json_output:
            self.stdout.write(json.dumps({"line": line, **data}))
        else:
            self.stdout.write(line)
        self.stdout.flush()
        sys.exit(code)
