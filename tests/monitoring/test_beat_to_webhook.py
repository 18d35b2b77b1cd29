"""The Procfile's `beat` and `monitor` processes: a dead letter reaches the webhook on their own."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.procfile import procfile_argv
from tests.harness import QUIET_WORKER, wait_until

pytestmark = pytest.mark.broker


def test_beat_and_monitor_worker_alert_the_webhook(processes, make_dead_letters, webhook, tmp_path):
    make_dead_letters(1)
    env = {
        "ALERT_CHECK_SECONDS": "1",
        "DLQ_WARNING_COUNT": "1",
        "ALERT_WEBHOOK_URL": webhook.url,
        "BEAT_SCHEDULE_FILENAME": str(tmp_path / "beat-schedule"),  # away from other test runs
    }
    monitor = processes.start_consumer("monitor", "monitoring", QUIET_WORKER, env=env)
    beat = processes.start(procfile_argv("beat"), env=env, name="beat")

    def checks_done() -> int:
        # The monitor's log of each check it ran is the behaviour here: checks go on.
        return monitor.log_text().count("] succeeded in")

    def alive_and(condition: Callable[[], object]) -> Callable[[], object]:
        def check() -> object:
            for process in (monitor, beat):
                assert process.poll() is None, process.log_text()[-3000:]
            return condition()

        return check

    def monitor_log() -> str:
        return f"monitor log:\n{monitor.log_text()[-3000:]}"

    wait_until(
        alive_and(lambda: webhook.about("dead_letters")),
        timeout=60,
        message=lambda: f"no alert reached the webhook; {monitor_log()}",
    )
    # Three more checks at the same level: the alert must not repeat.
    checks_then = checks_done()
    wait_until(
        alive_and(lambda: checks_done() >= checks_then + 3),
        timeout=60,
        message=lambda: f"the monitor stopped running checks; {monitor_log()}",
    )

    assert len(webhook.about("dead_letters")) == 1, monitor_log()
