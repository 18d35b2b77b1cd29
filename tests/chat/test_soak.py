"""The soak benchmark (bench/soak.py): finding the processes, its verdicts, and a one-minute run."""

from __future__ import annotations

import json
import shlex

import pytest

from bench.loadtest import Target
from bench.procfile import ROOT, procfile_command
from bench.soak import PROCESS_SIGNATURES, Series, _has_words, chat_processes_find, soak_run
from messaging.topology import ANALYTICS_QUEUE, DEAD_LETTER_QUEUE
from tests.harness import QUIET_WORKER


def procfile_names() -> set[str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {line.partition(":")[0].strip() for line in lines if line.strip() and not line.startswith("#")}


def test_every_procfile_process_is_told_apart_by_its_signature():
    assert set(PROCESS_SIGNATURES) == procfile_names()
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


def test_memory_that_grows_by_a_tenth_from_the_middle_third_to_the_last_is_growing():
    assert Series("rss", "memory", True, [80, 90, 100, 100, 108, 111]).verdict() == "growing"
    assert Series("rss", "memory", True, [60, 80, 100, 104, 109, 109]).verdict() == "flat"


def test_a_backlog_judges_the_last_third_against_the_first():
    assert Series("outbox", "backlog", False, [0, 40, 500, 600, 0, 30], slack=50).verdict() == "flat"
    assert Series("outbox", "backlog", False, [0, 10, 20, 40, 90, 300], slack=50).verdict() == "growing"


@pytest.mark.broker
@pytest.mark.timeout(400)
def test_a_one_minute_soak_of_the_running_processes_finds_nothing_growing(
    live_daphne, processes, relay_process, broker_url
):
    # No metrics endpoints: their fixed ports belong to whichever run's monitoring tests.
    started = {
        "worker": processes.start_consumer("worker", ANALYTICS_QUEUE.name, QUIET_WORKER),
        "notifier": processes.start_consumer("notifier", "notifications", QUIET_WORKER),
        "dlq_archiver": processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE.name),
        "relay": relay_process,
    }

    running = chat_processes_find(web_port=live_daphne.port)
    report = soak_run(target=Target(live_daphne.http_url), processes=running, minutes=1.0)

    found = {p.name: p.pid for p in running}
    assert found == {"web": live_daphne.pid, **{name: p.pid for name, p in started.items()}}
    summary = json.dumps(report.summary(), indent=1)
    assert report.ok, summary
    assert report.stored > 0 and report.traffic["mentions"] > 0, summary
    assert report.traffic["logins"] > 0 and report.traffic["logouts"] > 0, summary
    assert report.traffic["socket drops"] > 0 and report.traffic["history API"] > 0, summary
