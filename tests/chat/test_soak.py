"""The soak benchmark (bench/soak.py): finding the processes, its verdicts, and a one-minute run."""

from __future__ import annotations

import io
import json
import re
import shlex

import pytest
from django.core.management import CommandError, call_command

from bench.procfile import ROOT, procfile_command
from bench.soak import PROCESS_SIGNATURES, Series, _has_words, connection_bound
from messaging.topology import (
    ANALYTICS_QUEUE,
    DEAD_LETTER_QUEUE,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
)
from tests.harness import QUIET_WORKER


def procfile_names() -> set[str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {line.partition(":")[0].strip() for line in lines if line.strip() and not line.startswith("#")}


def test_every_procfile_process_is_told_apart_by_its_signature():
    assert set(PROCESS_SIGNATURES) == procfile_names() - {"lb"}
    for name, words in PROCESS_SIGNATURES.items():
        matching = [
            other for other in procfile_names() if _has_words(shlex.split(procfile_command(other)), words)
        ]
        assert matching == [name]


def test_connections_that_rise_after_the_warm_up_are_growing():
    series = Series("web db connections", "count", True, [5, 6, 6, 6, 6, 6, 7, 8, 9, 10], slack=2)

    assert series.verdict() == "growing"


def test_connections_that_stay_within_the_slack_are_flat():
    series = Series("web db connections", "count", True, [3, 6, 6, 6, 7, 8, 6, 6, 7, 8], slack=2)

    assert series.verdict() == "flat"


def test_connections_over_the_documented_bound_fail_even_during_the_warm_up():
    series = Series(
        "web db connections", "count", True, [2, 30, 30, 24, 24, 24, 24, 24, 24], slack=2, bound=25
    )

    assert series.verdict() == "over its bound"


def test_a_pool_filling_up_to_its_size_in_the_warm_up_is_flat():
    series = Series(
        "web db connections", "count", True, [2, 9, 22, 22, 21, 22, 22, 20, 22], slack=2, bound=25
    )

    assert series.verdict() == "flat"
    assert series.baseline() == 22  # the warm-up's maximum, not the sample before traffic


def documented_bounds() -> dict[str, int]:
    """docs/architecture.md's table of connections per process: `| `name` | ... **N** ... |`."""
    text = (ROOT / "docs/architecture.md").read_text()
    return {name: int(n) for name, n in re.findall(r"^\| `(\w+)` \| [^|]*\*\*(\d+)\*\*", text, flags=re.M)}


def test_each_procfile_process_is_held_to_the_connection_bound_the_docs_state():
    bounds = {
        name: connection_bound(name, shlex.split(procfile_command(name))) for name in PROCESS_SIGNATURES
    }

    assert bounds == documented_bounds()


def test_a_run_too_short_to_judge_is_refused_with_one_line():
    with pytest.raises(CommandError, match=r"^--minutes must be at least 1: .*growth\.$"):
        call_command("soak", "--minutes", "0.25", "--url", "http://127.0.0.1:9")


def test_memory_that_grows_by_a_tenth_from_the_middle_third_to_the_last_is_growing():
    assert Series("rss", "memory", True, [80, 90, 100, 100, 108, 111]).verdict() == "growing"
    assert Series("rss", "memory", True, [60, 80, 100, 104, 109, 109]).verdict() == "flat"


def test_a_backlog_judges_the_last_third_against_the_first():
    assert Series("outbox", "backlog", False, [0, 40, 500, 600, 0, 30], slack=50).verdict() == "flat"
    assert Series("outbox", "backlog", False, [0, 10, 20, 40, 90, 300], slack=50).verdict() == "growing"


@pytest.mark.broker
@pytest.mark.timeout(400)
def test_a_one_minute_soak_of_the_running_processes_finds_nothing_growing(
    live_daphne, processes, relay_process, broker_url, capsys
):
    # No metrics endpoints: their fixed ports belong to whichever run's monitoring tests.
    started = {
        "worker": processes.start_consumer("worker", ANALYTICS_QUEUE.name, QUIET_WORKER),
        "notifier": processes.start_consumer("notifier", NOTIFICATIONS_QUEUE_NAME, QUIET_WORKER),
        "notifier_vip": processes.start_consumer("notifier_vip", VIP_NOTIFICATIONS_QUEUE_NAME, QUIET_WORKER),
        "dlq_archiver": processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE.name),
        "relay": relay_process,
    }

    out = io.StringIO()
    try:
        call_command("soak", "--minutes", "1", "--url", live_daphne.http_url, "--json", stdout=out)
    except CommandError as error:
        pytest.fail(f"{error}\n{out.getvalue()}")

    report = json.loads(out.getvalue())
    shown = json.dumps({k: v for k, v in report.items() if k != "series"}, indent=1)
    assert report["processes"] == {"web": live_daphne.pid, **{name: p.pid for name, p in started.items()}}
    assert report["ok"], out.getvalue()
    connections = {s["name"]: s for s in report["series"] if s["name"].endswith("db connections")}
    assert connections["web db connections"]["bound"] == documented_bounds()["web"]
    traffic = report["traffic"]
    assert report["stored_messages"] > 0 and traffic["mentions"] > 0, shown
    assert traffic["logins"] > 0 and traffic["logouts"] > 0, shown
    assert traffic["socket drops"] > 0 and traffic["history API"] > 0, shown
    # Every message sent is accounted for, and the stored ones are exactly those that came back
    # to their sender plus those whose socket dropped first but were stored.
    refused, unacknowledged = traffic.get("messages refused", 0), traffic.get("messages unacknowledged", 0)
    assert traffic["messages sent"] == traffic["messages acknowledged"] + refused + unacknowledged, shown
    assert report["stored_messages"] == traffic["messages acknowledged"] + report["unacknowledged_stored"], (
        shown
    )
    # The sockets acknowledge the notifications pushed to them, as the page does.
    assert traffic["notifications pushed"] > 0, shown
    assert traffic["notifications acknowledged"] == traffic["notifications pushed"], shown
    assert report["notifications"]["acknowledged on a socket"] > 0, shown
    err = capsys.readouterr().err
    assert re.search(r"^ *\d+/60 s  web \d+ conns", err, flags=re.M), (
        "a plain progress line without a terminal"
    )
    assert err.strip().splitlines()[-1] == (
        f"soak passed: nothing grew over 1 minute; {report['stored_messages']} stored messages "
        "counted exactly once"
    )
