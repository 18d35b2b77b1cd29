"""The Procfile's `beat` and `monitor` processes: a dead letter reaches the webhook on their own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.procfile import procfile_command

pytestmark = pytest.mark.broker


def test_beat_and_monitor_worker_alert_the_webhook(start_process, make_dead_letters, webhook, tmp_path):
    make_dead_letters(1)
    env = {
        "ALERT_CHECK_SECONDS": "1",
        "DLQ_WARNING_COUNT": "1",
        "ALERT_WEBHOOK_URL": webhook.url,
        "BEAT_SCHEDULE_FILENAME": str(tmp_path / "beat-schedule"),  # away from other test runs
    }
    monitor = start_process(
        [
            "bash",
            "-c",
            f"exec {procfile_command('monitor')} --metrics-port 0 --without-mingle --without-gossip",
        ],
        env=env,
    )
    beat = start_process(["bash", "-c", f"exec {procfile_command('beat')}"], env=env)

    def checks_done() -> int:
        return Path(monitor.log_path).read_text().count("] succeeded in")

    def wait_for(condition, message: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            for process in (monitor, beat):
                assert process.poll() is None, Path(process.log_path).read_text()[-3000:]
            if time.monotonic() > deadline:
                pytest.fail(f"{message}; monitor log:\n{Path(monitor.log_path).read_text()[-3000:]}")
            time.sleep(0.2)

    wait_for(lambda: webhook.about("dead_letters"), "no alert reached the webhook")
    # Three more checks at the same level: the alert must not repeat.
    checks_then = checks_done()
    wait_for(lambda: checks_done() >= checks_then + 3, "the monitor stopped running checks")

    assert len(webhook.about("dead_letters")) == 1, Path(monitor.log_path).read_text()[-3000:]
    assert webhook.about("dead_letters")[0]["alert"]["level"] == "WARNING"
