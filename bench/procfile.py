"""Running the Procfile's processes as children (the test suite's live server, `manage.py loadtest`).

Both start the Procfile's own command rather than a copy of it, so they exercise its flags
(daphne's frame limits) exactly as `make run` does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import connection

from infrastructure.postgres import database_url

ROOT = Path(__file__).resolve().parent.parent


def procfile_command(name: str) -> str:
    """The command line of process `name` in the Procfile; KeyError when there is none."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise KeyError(f"no {name!r} process in the Procfile")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`.

    RuntimeError after `timeout`, or as soon as `process` (the one meant to listen) has exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process meant to listen on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout}s")


def child_process_env() -> dict[str, str]:
    """Environment for a child process that must use the same database as this one.

    Under pytest that is the test database, whose name exists only in this process's settings.
    """
    return {
        **os.environ,
        "DATABASE_URL": database_url(connection.settings_dict),
        "DJANGO_SETTINGS_MODULE": "chatproject.settings",
        "PYTHONUNBUFFERED": "1",
        # Same Redis namespace too: under pytest, the run's own (tests/conftest.py).
        "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        # Same key too: the child reads the sessions (and checks the CSRF tokens) this process signs.
        "SECRET_KEY": settings.SECRET_KEY,
        # Same collected static files (under pytest, the run's own: tests/conftest.py).
        "STATIC_ROOT": str(settings.STATIC_ROOT),
    }


@dataclass
class DaphneServer:
    """The Procfile's `web` process on 127.0.0.1:`port`, sharing this process's database.

    With `log_path`, its stdout and stderr are appended there (across restarts), so tests can
    read what the server logged; without, they are discarded.
    """

    port: int
    process: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        # `exec` below makes the shell's pid daphne's own.
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self) -> None:
        env = child_process_env()
        env.update(HOST="127.0.0.1", PORT=str(self.port), **self.extra_env)
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        log = self.log_path.open("ab") if self.log_path else None
        try:
            self.process = subprocess.Popen(
                ["bash", "-c", f"exec {procfile_command('web')}"],
                cwd=ROOT,
                env=env,
                stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            )
        finally:
            if log:
                log.close()  # the child holds its own descriptor
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
