"""Running the Procfile's processes as children: the test suite's harness (tests/harness.py), the
benchmarks (`manage.py loadtest`, `bench_analytics_lag`, `bench_priority`).

They start the Procfile's own command rather than a copy of it, so they exercise its flags
(daphne's frame limits) exactly as `make run` does. A child counts as started once a probe sees it
serve: its port answers, its queue has one more consumer, its LISTEN is registered; never once a
line appears in its log, whose wording is free to change.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
from amqp.exceptions import NotFound
from django.conf import settings
from django.db import connection

from infrastructure.postgres import database_url
from messaging.connection import broker_connection
from messaging.outbox import OUTBOX_NOTIFY_CHANNEL

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
# A readiness check: true once the child serves.
Probe = Callable[[], bool]


class ProcessNotReady(RuntimeError):
    """A child exited, or did not pass its readiness probe in time; the message says which."""


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


def wait_until(condition: Callable[[], T], *, timeout: float, message: str | Callable[[], str]) -> T:
    """Poll `condition` until it is truthy and return its value; TimeoutError(`message`) after `timeout`.

    `timeout` is an upper bound for a stuck process, never a performance claim.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"{text} (waited {timeout:.0f}s)")
        time.sleep(0.1)


def port_open(port: int) -> Probe:
    """Something accepts connections on 127.0.0.1:`port` (daphne, a metrics endpoint)."""

    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def queue_consumers(broker_url: str, queue: str) -> int:
    """How many consumers `queue` has now (passive declare); 0 while nobody has declared it.

    Through the first node of a cluster's failover URL that answers, like the processes it waits for.
    """
    with broker_connection(broker_url) as conn:
        try:
            _, _, consumers = conn.default_channel.queue_declare(queue, passive=True)
        except NotFound:
            return 0
        return consumers


def outbox_listeners() -> int:
    """Sessions of this process's database that LISTEN for outbox events (relays, once connected)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            [f"LISTEN {OUTBOX_NOTIFY_CHANNEL}"],
        )
        return cursor.fetchone()[0]


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
class ProcfileProcess:
    """A child in its own process group, so that stop and kill reach its own children (a Celery
    worker's pool) too, like a host going away.

    `argv` is usually `procfile_argv(name, ...)`. With `log_path`, stdout and stderr are appended
    there (across restarts) for assertions about what it logged; without, they are discarded.
    `start` returns once `ready` (if any) is true.
    """

    argv: list[str]
    env: Mapping[str, str]
    log_path: Path | None = None
    ready: Probe | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def start(self, timeout: float = 60.0) -> None:
        """Start the child and wait for its probe; ProcessNotReady if it exits or times out first
        (killed then, since nobody else would stop it)."""
        env = {**self.env, "PATH": f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"}
        log = self.log_path.open("ab") if self.log_path else None
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=env,
                stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log:
                log.close()  # the child holds its own descriptor
        if self.ready is not None:
            try:
                wait_until(self._ready_or_exited, timeout=timeout, message=f"{self} was not ready")
            except TimeoutError as error:
                self.kill()
                raise ProcessNotReady(f"{error}{self._log_tail()}") from None

    def _ready_or_exited(self) -> bool:
        if self.poll() is not None:
            raise ProcessNotReady(f"{self} exited with {self.returncode}{self._log_tail()}")
        assert self.ready is not None
        return self.ready()

    def poll(self) -> int | None:
        return self.process.poll() if self.process else None

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group (shutdown code runs), SIGKILL it after `timeout`."""
        if self.poll() is None and self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs, nothing is acked."""
        if self.poll() is None and self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_text(self) -> str:
        """What the child logged so far: for assertions about logging, not for readiness."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _log_tail(self) -> str:
        return f"; log:\n{self.log_text()[-3000:]}" if self.log_path else ""

    def __str__(self) -> str:
        return " ".join(self.argv[2:] if self.argv[:2] == ["bash", "-c"] else self.argv)[:120]


def procfile_argv(name: str, extra_args: str = "") -> list[str]:
    """The Procfile's process `name`, later options in `extra_args` winning; `exec` makes the
    shell's pid the process's own."""
    return ["bash", "-c", f"exec {procfile_command(name)} {extra_args}".rstrip()]


@dataclass
class DaphneServer:
    """The Procfile's `web` process on 127.0.0.1:`port`, sharing this process's database.

    With `log_path`, its stdout and stderr are appended there (across restarts), so tests can
    read what the server logged; without, they are discarded. Unless `balanced` (behind a load
    balancer that must first take it out of rotation), it closes its sockets at once on SIGTERM.
    """

    port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    balanced: bool = False
    child: ProcfileProcess | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child and self.child.poll() is None else None

    def start(self) -> None:
        """ProcessNotReady (a RuntimeError) when it exits or does not listen within 20 s."""
        env = {
            **child_process_env(),
            "WEB_HOST": "127.0.0.1",
            "PORT": str(self.port),
            **({} if self.balanced else {"WEB_DRAIN_SECONDS": "0"}),
            **self.extra_env,
        }
        self.child = ProcfileProcess(
            procfile_argv("web"), env=env, log_path=self.log_path, ready=port_open(self.port)
        )
        self.child.start(timeout=20.0)

    def stop(self) -> None:
        if self.child:
            self.child.stop(timeout=10.0)
        self.child = None

    def kill(self) -> None:
        if self.child:
            self.child.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


# A web process in a config the Procfile's lb wrote (ops/haproxy/haproxy.cfg.template).
_BALANCED_SERVER_LINE = re.compile(r"^\s*server\s+(\S+)\s+(\S+):(\d+)\b", re.M)


def listening_pid(port: int) -> int | None:
    """The local process listening on TCP `port`, None when none is (or it is not ours to see)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def serving_processes(port: int) -> tuple[int | None, dict[str, int]]:
    """(load balancer pid, name -> pid of each web process) serving 127.0.0.1:`port` on this machine.

    Behind the Procfile's lb, the web processes are the servers its HAProxy config lists, each
    found by the port it listens on; a web process serving `port` itself is named "web". Empty
    when nothing local listens there (or web processes on other hosts).
    """
    pid = listening_pid(port)
    if pid is None:
        return None, {}
    process = psutil.Process(pid)
    cmdline = process.cmdline()
    if process.name() != "haproxy" or "-f" not in cmdline[:-1]:
        return None, {"web": pid}
    config = Path(cmdline[cmdline.index("-f") + 1]).read_text()
    servers = {}
    for name, _host, server_port in _BALANCED_SERVER_LINE.findall(config):
        server_pid = listening_pid(int(server_port))
        if server_pid is not None:
            servers[name] = server_pid
    return pid, servers


@dataclass(frozen=True)
class BalancedServer:
    """One web process as the load balancer sees it (a row of HAProxy's `show stat`)."""

    name: str
    address: str
    # UP, DOWN, "UP 1/2" (rising), "DOWN 1/2" (failing), MAINT, ...
    status: str
    sessions: int

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


def balanced_servers(admin_socket: Path) -> list[BalancedServer]:
    """The web processes behind a running `lb`, from its admin socket (LOADBALANCER_RUN_DIR)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(admin_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().lstrip("# ").splitlines()
    return [
        BalancedServer(row["svname"], row["addr"], row["status"], int(row["scur"] or 0))
        for row in csv.DictReader(lines)
        if row.get("pxname") == "web" and row["svname"] not in ("FRONTEND", "BACKEND")
    ]


@dataclass
class LoadBalancer:
    """The Procfile's `lb` (HAProxy) on 127.0.0.1:`port` in front of `servers` (`host:port` each).

    It writes its config and admin socket to `run_dir`.
    """

    port: int
    servers: list[str]
    run_dir: Path
    log_path: Path | None = None
    child: ProcfileProcess | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"

    def start(self) -> None:
        """ProcessNotReady when HAProxy exits or does not listen within 20 s."""
        env = {
            **child_process_env(),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_SERVERS": ",".join(self.servers),
            "WEB_CONCURRENCY": str(len(self.servers)),
            "LOADBALANCER_RUN_DIR": str(self.run_dir),
        }
        self.child = ProcfileProcess(
            procfile_argv("lb"), env=env, log_path=self.log_path, ready=port_open(self.port)
        )
        self.child.start(timeout=20.0)

    def servers_state(self) -> list[BalancedServer]:
        return balanced_servers(self.admin_socket)

    def servers_up(self, ports: list[int] | None = None) -> bool:
        """Whether HAProxy sends connections to each of `ports` (default: every server) now."""
        try:
            state = {server.port: server.status for server in self.servers_state()}
        except OSError:
            return False  # not listening on its admin socket yet
        return all(state.get(port) == "UP" for port in (ports or state))

    def stop(self) -> None:
        if self.child:
            self.child.stop(timeout=10.0)
        self.child = None


@dataclass
class WebTier:
    """`size` web processes (the Procfile's `web`) behind the Procfile's `lb`: the topology of
    `make run` and docker-compose.yml, on free ports and this process's database.

    `start` returns once the load balancer sends connections to every web process.
    """

    size: int
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    servers: list[DaphneServer] = field(default_factory=list)
    balancer: LoadBalancer | None = None

    @property
    def http_url(self) -> str:
        assert self.balancer is not None
        return self.balancer.http_url

    def start(self, run_dir: Path) -> None:
        """ProcessNotReady (a RuntimeError) when a process exits, or is not up within 20 s."""
        port = free_port()
        env = {"SITE_PORT": str(port), **self.extra_env}
        self.servers = [
            DaphneServer(port=free_port(), extra_env=env, log_path=self._log(f"web-{n}.log"), balanced=True)
            for n in range(1, self.size + 1)
        ]
        _each_at_once([server.start for server in self.servers])
        self.balancer = LoadBalancer(
            port=port,
            servers=[f"127.0.0.1:{server.port}" for server in self.servers],
            run_dir=run_dir,
            log_path=self._log("lb.log"),
        )
        self.balancer.start()
        self.wait_balanced()

    def wait_balanced(self, timeout: float = 20.0) -> None:
        """Return once the load balancer sends connections to every web process that runs."""
        assert self.balancer is not None
        ports = [server.port for server in self.servers if server.pid is not None]
        try:
            wait_until(
                lambda: self.balancer.servers_up(ports),
                timeout=timeout,
                message=lambda: (
                    f"the load balancer does not use every web process: {self.balancer.servers_state()}"
                ),
            )
        except TimeoutError as error:
            raise ProcessNotReady(str(error)) from None

    def _states(self) -> list[BalancedServer] | str:
        try:
            return self.balancer.servers_state() if self.balancer else "not started"
        except OSError as error:
            return f"admin socket not answering ({error})"

    def sessions(self) -> dict[int, int]:
        """Port -> connections the load balancer has open to each web process now (its sockets)."""
        assert self.balancer is not None
        return {server.port: server.sessions for server in self.balancer.servers_state()}

    def server_pids(self) -> dict[int, int]:
        """Port -> pid of each web process that runs."""
        return {server.port: server.pid for server in self.servers if server.pid is not None}

    def stop(self) -> None:
        """Stop everything at once: each web process drains for WEB_DRAIN_SECONDS."""
        _each_at_once(
            [server.stop for server in self.servers] + ([self.balancer.stop] if self.balancer else [])
        )

    def _log(self, name: str) -> Path | None:
        return self.log_dir / name if self.log_dir else None


def _each_at_once(calls: list[Callable[[], object]]) -> None:
    """Run `calls` in threads of their own and wait for all; the first exception is raised."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()
