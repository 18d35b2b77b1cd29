"""docker-compose.yml must run what the Procfile runs: same processes, same commands."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import yaml
from django.conf import settings

from bench.procfile import procfile_command
from tests.conftest import ROOT


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def unwrap_shell(command: str) -> str:
    """`sh -c 'exec X'` with compose's `$$` escapes, as the Procfile writes X."""
    match = re.fullmatch(r"sh -c '(?:exec )?(.*)'", command)
    return (match.group(1) if match else command).replace("$$", "$")


def test_every_procfile_process_is_a_compose_service_with_the_same_command():
    services = compose_services()
    names = re.findall(r"^([A-Za-z0-9_]+):", (ROOT / "Procfile").read_text(), flags=re.M)
    assert "web" in names and len(names) > 1
    for name in names:
        assert name in services, f"docker-compose.yml has no service for the Procfile's {name!r}"
        assert unwrap_shell(services[name]["command"]) == procfile_command(name)


def test_compose_has_the_backing_services_with_health_checks():
    services = compose_services()
    for name in ("postgres", "redis", "rabbitmq", "web"):
        assert "healthcheck" in services[name]
    plugins = (ROOT / "ops/rabbitmq/enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins


def test_compose_mounts_what_prometheus_and_grafana_are_provisioned_from():
    services = compose_services()
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{service} mounts {source}, which does not exist"
    datasource = yaml.safe_load((ROOT / "ops/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert list((ROOT / "ops/grafana/dashboards").glob("*.json"))


def test_compose_carries_no_default_secret_key():
    app_environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-app"]["environment"]

    # `${VAR:?message}`: compose refuses to start (with the message) when SECRET_KEY is unset or empty.
    assert re.fullmatch(r"\$\{SECRET_KEY:\?[^}]+\}", app_environment["SECRET_KEY"])


def requirement_names(path: str) -> set[str]:
    names = set()
    for line in (ROOT / path).read_text().splitlines():
        if line.strip() and not line.startswith(("#", "-r")):
            names.add(re.split(r"[=<>~\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_production_requirements_carry_no_development_tools():
    production = requirement_names("requirements.txt")
    development = requirement_names("requirements-dev.txt")  # pinned on top of requirements.txt

    assert {"honcho", "pika", "pytest", "pytest-django", "playwright", "ruff"} <= development
    assert not production & development
    assert "requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()[1]
    installs = re.findall(r"pip install .*", (ROOT / "Dockerfile").read_text())
    assert installs == ["pip install -r requirements.txt"]


def procfile_names() -> list[str]:
    return re.findall(r"^([A-Za-z0-9_]+):", (ROOT / "Procfile").read_text(), flags=re.M)


def test_every_procfile_process_names_its_database_sessions():
    # The load balancer is HAProxy: it has no database sessions.
    for name in set(procfile_names()) - {"lb"}:
        assert shlex.split(procfile_command(name))[:2] == ["env", f"DB_APPLICATION_NAME=chat-{name}"]


def test_procfile_and_compose_run_web_concurrency_web_processes_behind_one_load_balancer():
    # honcho gives the first process type `--port` and the second the ports from PORT + 100 on,
    # where the load balancer looks for the web processes by default (settings.WEB_SERVERS).
    assert procfile_names()[:2] == ["lb", "web"]
    assert "-p ${PORT:-8100}" in procfile_command("web")
    services = compose_services()
    lb, web = services["lb"], services["web"]
    web_port = web["environment"]["PORT"]
    assert lb["ports"] == [f"{lb['environment']['PORT']}:{lb['environment']['PORT']}"]
    assert "ports" not in web  # reached through lb only
    assert lb["environment"]["WEB_SERVERS_DNS"] == f"web:{web_port}"
    app_environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-app"]["environment"]
    assert web["deploy"]["replicas"] == app_environment["WEB_CONCURRENCY"] == "${WEB_CONCURRENCY:-2}"
    assert app_environment["SITE_PORT"] == lb["environment"]["PORT"]
    # The Makefile starts as many as the load balancer lists, and tells them the public port.
    run = re.search(r"^run:.*?(?=^\S)", (ROOT / "Makefile").read_text(), flags=re.M | re.S).group(0)
    assert "--concurrency web=$(WEB_CONCURRENCY)" in run and "SITE_PORT=" in run
    assert re.search(r"^export WEB_CONCURRENCY$", (ROOT / "Makefile").read_text(), flags=re.M)


def scraped_worker_ports() -> dict[str, int]:
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "celery-workers")
    return {target["names"][0]: target["port"] for target in job["dns_sd_configs"]}


def test_each_worker_takes_its_metrics_port_from_its_own_variable_defaulting_to_the_scraped_port():
    variables = {}
    for name, port in scraped_worker_ports().items():
        match = re.search(r"--metrics-port \$\{([A-Z_]+_METRICS_PORT):-(\d+)\}", procfile_command(name))
        assert match, f"the Procfile's {name} has a fixed --metrics-port"
        assert int(match.group(2)) == port
        variables[name] = match.group(1)
    assert variables["worker"] == "WORKER_METRICS_PORT"  # the setting worker_metrics.py defaults to
    assert len(set(variables.values())) == len(variables)

    for name, variable in variables.items():
        expanded = subprocess.run(
            ["bash", "-c", f"printf '%s\\n' {procfile_command(name)}"],
            env={**os.environ, variable: "19999"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert expanded[expanded.index("--metrics-port") + 1] == "19999"


def test_beat_keeps_its_schedule_in_the_checkout_git_ignored():
    assert "--schedule" not in procfile_command("beat")  # CELERY_BEAT_SCHEDULE_FILENAME applies
    schedule = Path(settings.CELERY_BEAT_SCHEDULE_FILENAME)

    assert schedule.parent == ROOT
    ignored = subprocess.run(["git", "check-ignore", "-q", str(schedule)], cwd=ROOT)
    assert ignored.returncode == 0
