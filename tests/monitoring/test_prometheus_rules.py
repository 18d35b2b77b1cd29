"""ops/prometheus: the rules and the scrape config are valid, and the rules fire as unit-tested."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from chatproject.procfile import ROOT

PROMETHEUS = ROOT / "ops" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail("promtool is missing: `make test` installs it (apt-get install prometheus)")
    return subprocess.run([executable, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", "alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_is_valid_and_loads_the_rules():
    result = promtool("check", "config", "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_rules_cover_dead_letters_queues_outbox_and_errors():
    text = (PROMETHEUS / "alerts.yml").read_text()

    for alert in (
        "DeadLettersPilingUp",
        "QueueWithoutConsumers",
        "OutboxLagging",
        "TaskFailureRateHigh",
        "WebErrorRateHigh",
    ):
        assert f"alert: {alert}" in text


def test_rules_and_dashboard_use_only_metrics_the_code_defines():
    from chatproject.monitoring import metrics

    defined = {*metrics.PROJECT_METRIC_NAMES, *metrics.WORKER_METRIC_NAMES, metrics.SOURCE_UP}
    texts = (PROMETHEUS / "alerts.yml").read_text() + (
        ROOT / "ops" / "grafana" / "dashboards" / "chat-dashboard.json"
    ).read_text()

    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for name in re.findall(r"\b(?:chat|celery)_[a-z_]*[a-z]\b", texts)
    }

    assert sorted(used - defined) == []
