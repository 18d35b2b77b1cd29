"""Real analytics worker processes (the Procfile's `worker` command) for the pipeline tests.

Each worker runs in its own process group against this session's RabbitMQ vhost (`broker_url`)
and the test database, so a test can SIGKILL the whole worker (parent and pool child) like a
host dying.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kombu import Connection

from bench.procfile import ROOT, child_process_env, procfile_command
from messaging.topology import ANALYTICS_QUEUE, declare_topology
from tests.waiting import wait_until


@dataclass
class ChildProcess:
    """A child in its own process group, logging to a file the test can read."""

    name: str
    command: str
    env: dict[str, str]
    log_path: Path
    ready_line: str | None = None
    process: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    def start(self, timeout: float = 60.0) -> None:
        env = {**self.env, "PATH": f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"}
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {self.command}"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.ready_line:
            wait_until(
                lambda: self._alive_or_fail() and self.ready_line in self.log_text(),
                timeout=timeout,
                message=f"{self.name} did not log {self.ready_line!r}; log:\n{self.log_text()[-3000:]}",
            )

    def _alive_or_fail(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}; log:\n{self.log_text()[-3000:]}")
        return True

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs, nothing is acked."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def start_worker(transactional_db, broker_url, tmp_path) -> Iterator[Callable[..., ChildProcess]]:
    """Start analytics workers: the Procfile's `worker` command with one pool process.

    Keyword arguments become environment variables (the fault-injection settings).
    """
    # Task messages a previous test left in the session's vhost name rows of a flushed database.
    with Connection(broker_url) as connection:
        declare_topology(connection)
        ANALYTICS_QUEUE.bind(connection.default_channel).purge()
    workers: list[ChildProcess] = []

    def start(**extra_env: str) -> ChildProcess:
        name = f"analytics-test-{uuid.uuid4().hex[:8]}"
        env = {**child_process_env(), "CELERY_BROKER_URL": broker_url, **extra_env}
        worker = ChildProcess(
            name=name,
            # Later options win: one pool process makes "the batch in hand" a single message.
            # No metrics endpoint: port 9808 belongs to whichever worker the monitoring tests run.
            command=f"{procfile_command('worker')} --concurrency 1 --hostname {name}@%h "
            "--without-mingle --without-gossip --metrics-port 0",
            env=env,
            log_path=tmp_path / f"{name}.log",
            ready_line=" ready.",
        )
        workers.append(worker)
        worker.start()
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def start_relay(transactional_db, broker_url, tmp_path) -> Iterator[Callable[..., ChildProcess]]:
    """Start the Procfile's relay and wait until it is connected; stopped (SIGTERM) at teardown.

    Unlike tests/conftest.py's `relay_process` it waits for the connection. Keyword arguments
    become environment variables (tests/faults/points.py's fault_env).
    """
    relays: list[ChildProcess] = []

    def start(**extra_env: str) -> ChildProcess:
        relay = ChildProcess(
            name="relay",
            command=f"{procfile_command('relay')} --poll-seconds 0.5",
            env={**child_process_env(), "CELERY_BROKER_URL": broker_url, **extra_env},
            log_path=tmp_path / f"relay-{len(relays)}.log",
            ready_line="relay connected",
        )
        relays.append(relay)
        relay.start()
        return relay

    yield start
    for relay in relays:
        relay.stop()
