"""`make run`'s topology: honcho, the Procfile and the load balancer's defaults agree on where the
web processes listen (tests/ops/test_deployment_files.py checks docker-compose.yml against it)."""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from bench.procfile import (
    BalancedServer,
    ProcfileProcess,
    balanced_servers,
    child_process_env,
    free_port,
    port_open,
)
from tests.harness import wait_until


def ports_free(*ports: int) -> bool:
    return not any(port_open(port)() for port in ports)


def servers_all_up(admin_socket: Path) -> list[BalancedServer] | None:
    try:
        servers = balanced_servers(admin_socket)
    except OSError:
        return None  # HAProxy is not answering on it yet
    return servers if servers and all(server.status == "UP" for server in servers) else None


@pytest.mark.django_db(transaction=True)
def test_honcho_puts_web_concurrency_web_processes_where_the_load_balancer_looks():
    port = wait_until(
        lambda: (p := free_port()) < 65000 and ports_free(p + 100, p + 101) and p,
        timeout=10,
        message="no free ports",
    )
    honcho = str(Path(sys.executable).parent / "honcho")
    with tempfile.TemporaryDirectory(prefix="chat-lb-") as run_dir:
        # Only the Procfile's environment variables that `make run` sets: no WEB_SERVERS.
        env = {**child_process_env(), "WEB_CONCURRENCY": "2", "LOADBALANCER_RUN_DIR": run_dir}
        env["SITE_PORT"] = str(port)
        env.pop("WEB_SERVERS", None)
        runner = ProcfileProcess(
            [honcho, "start", "--port", str(port), "--concurrency", "web=2", "lb", "web"],
            env=env,
            ready=port_open(port),
        )
        runner.start()
        try:
            servers = wait_until(
                lambda: (
                    (s := balanced_servers(Path(run_dir) / "admin.sock"))
                    and all(server.status == "UP" for server in s)
                    and s
                ),
                timeout=60,
                message="the load balancer never had both web processes up",
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?only=web", timeout=10) as response:
                answer = json.loads(response.read())
        finally:
            runner.stop(timeout=30)

    assert sorted(server.port for server in servers) == [port + 100, port + 101]
    assert answer == {"web": "ok", "status": "ok"}
