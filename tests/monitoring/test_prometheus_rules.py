"""ops/prometheus: the rules and the scrape config are valid, and the rules fire as unit-tested."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from bench.procfile import ROOT

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


# Where docker-compose.yml's Prometheus writes the token on start, in memory (a tmpfs).
TOKEN_FILE = "/run/metrics/token"


def test_scrape_config_is_valid_and_loads_the_rules(tmp_path):
    # promtool checks that the token file exists: a copy of the config points at one in tmp_path.
    token = tmp_path / "metrics_token"
    token.write_text("a-token\n")
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert TOKEN_FILE in config
    (tmp_path / "prometheus.yml").write_text(config.replace(TOKEN_FILE, str(token)))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")

    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_web_scrape_presents_the_token_compose_gives_the_web_process():
    jobs = {
        job["job_name"]: job
        for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    }
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    assert jobs["web"]["authorization"] == {"type": "Bearer", "credentials_file": TOKEN_FILE}
    prometheus = services["prometheus"]
    assert f'printf %s "$$METRICS_BEARER_TOKEN" > {TOKEN_FILE} &&' in prometheus["entrypoint"][-1]
    assert TOKEN_FILE.rpartition("/")[0] in prometheus["tmpfs"]
    for service in ("web", "prometheus"):
        assert services[service]["environment"]["METRICS_BEARER_TOKEN"].startswith("${METRICS_BEARER_TOKEN:?")


def test_unauthenticated_metrics_ports_are_not_published_by_compose():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    jobs = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    ports = {
        (config["names"][0], config["port"])
        for job in jobs
        if job["job_name"] in ("relay", "celery-workers")
        for config in job["dns_sd_configs"]
    }

    assert ports
    for service, port in ports:
        published = [str(mapping) for mapping in services[service].get("ports", [])]
        assert not any(str(port) in mapping for mapping in published), f"{service} publishes {port}"
        # Inside its container the endpoint must listen beyond loopback for Prometheus to reach it.
        assert services[service]["environment"]["METRICS_BIND_ADDRESS"] == "0.0.0.0"


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
    from monitoring import metrics

    defined = {*metrics.PROJECT_METRIC_NAMES, *metrics.WORKER_METRIC_NAMES, metrics.SOURCE_UP}
    texts = (PROMETHEUS / "alerts.yml").read_text() + (
        ROOT / "ops" / "grafana" / "dashboards" / "chat-dashboard.json"
    ).read_text()

    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for name in re.findall(r"\b(?:chat|celery)_[a-z_]*[a-z]\b", texts)
    }

    assert sorted(used - defined) == []
