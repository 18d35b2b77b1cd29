"""The one harness for tests that start real processes: the Procfile's commands as children of a test.

Children run on the test database and this session's RabbitMQ vhost (tests/cluster/conftest.py's
`cluster_processes`: a vhost of the three-node cluster), each in its own process
group (a SIGKILL takes a Celery worker's pool along, like a host dying), logging to the test's
tmp_path, and are SIGKILLed when the test ends. A start returns once the child serves, as a probe
sees it (bench/procfile.py): a port that answers, one more consumer on its queue, its LISTEN
registered. Logs are read only where what a process logs is the behaviour under test.

An `env` holding FAULT_POINTS runs the child with tests/faults/settings.py, which reads them.
Registered by tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import pytest
from kombu import Connection

from bench import procfile
from bench.procfile import (
    DaphneServer,
    ProcfileProcess,
    WebTier,
    child_process_env,
    free_port,
    outbox_listeners,
    procfile_argv,
    queue_consumers,
)
from messaging.topology import (
    ANALYTICS_QUEUE,
    DEAD_LETTER_QUEUE,
    NOTIFICATIONS_QUEUE_NAME,
    VIP_NOTIFICATIONS_QUEUE_NAME,
    declare_topology,
)

T = TypeVar("T")

FAULT_SETTINGS_MODULE = "tests.faults.settings"
# Celery workers under test: no gossip or mingle with other workers (a second of start-up each),
# and no metrics endpoint: the Procfile's fixed ports belong to whichever test serves metrics.
QUIET_WORKER = "--without-mingle --without-gossip --metrics-port 0"


def wait_until(condition: Callable[[], T], *, timeout: float, message: str | Callable[[], str]) -> T:
    """Poll `condition` until it is truthy and return its value; fail the test with `message` after
    `timeout`, an upper bound for a stuck process, never a performance claim."""
    try:
        return procfile.wait_until(condition, timeout=timeout, message=message)
    except TimeoutError as error:
        pytest.fail(str(error))


class Processes:
    """The children of one test; `start*` return once the child serves."""

    def __init__(self, *, broker_url: str, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.broker_url = broker_url
        self.log_dir = log_dir
        self.base_env = dict(env or {})  # every child's, under each start's own `env`
        self.children: list[ProcfileProcess] = []
        # Children counted by a probe, with what they are counted in (a queue, the outbox LISTEN).
        self._counted: list[tuple[ProcfileProcess, str]] = []

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**child_process_env(), "CELERY_BROKER_URL": self.broker_url, **self.base_env, **(extra or {})}
        if "FAULT_POINTS" in env:
            env["DJANGO_SETTINGS_MODULE"] = FAULT_SETTINGS_MODULE
        return env

    def start(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        ready: procfile.Probe | None = None,
        name: str = "child",
    ) -> ProcfileProcess:
        child = ProcfileProcess(
            argv,
            env=self.env(env),
            log_path=self.log_dir / f"{name}-{len(self.children)}.log",
            ready=ready,
        )
        self.children.append(child)
        try:
            child.start()
        except procfile.ProcessNotReady as error:
            pytest.fail(str(error))
        return child

    def start_counted(
        self,
        argv: list[str],
        *,
        counter: str,
        count: Callable[[], int],
        env: Mapping[str, str] | None,
        name: str,
    ) -> ProcfileProcess:
        """Start a child that is ready once `count()` is above the children already counted there.

        Children killed a moment ago may still be counted by the broker or the database: that can
        only end the wait early, never hang it.
        """
        expected = 1 + sum(1 for child, where in self._counted if where == counter and child.poll() is None)
        child = self.start(argv, env=env, ready=lambda: count() >= expected, name=name)
        self._counted.append((child, counter))
        return child

    def start_consumer(
        self, name: str, queue: str, extra_args: str = "", *, env: Mapping[str, str] | None = None
    ) -> ProcfileProcess:
        """The Procfile's `name`, once `queue` has one more consumer."""
        return self.start_counted(
            procfile_argv(name, extra_args),
            counter=f"queue {queue}",
            count=lambda: queue_consumers(self.broker_url, queue),
            env=env,
            name=name,
        )

    def start_analytics_worker(self, *, env: Mapping[str, str] | None = None) -> ProcfileProcess:
        """The Procfile's analytics worker with one pool process, once `analytics` has one more
        consumer. One pool process makes "the batch in hand" a single message."""
        name = f"analytics-test-{uuid.uuid4().hex[:8]}"
        return self.start_consumer(
            "worker", ANALYTICS_QUEUE.name, f"--concurrency 1 --hostname {name}@%h {QUIET_WORKER}", env=env
        )

    def start_relay(self, extra_args: str = "", *, env: Mapping[str, str] | None = None) -> ProcfileProcess:
        """The Procfile's relay, once its LISTEN is registered (it connects the broker right after,
        and publishes whatever is pending first)."""
        return self.start_counted(
            procfile_argv("relay", extra_args),
            counter="outbox",
            count=outbox_listeners,
            env=env,
            name="relay",
        )

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()


@pytest.fixture
def processes(transactional_db, broker_url, tmp_path) -> Iterator[Processes]:
    started = Processes(broker_url=broker_url, log_dir=tmp_path)
    yield started
    started.kill_all()


@pytest.fixture
def start_process(processes) -> Callable[..., ProcfileProcess]:
    """`start_process(argv, env={...})`: any command line, returned as soon as it is started."""

    def start(argv: list[str], env: Mapping[str, str] | None = None) -> ProcfileProcess:
        return processes.start(argv, env=env)

    return start


@pytest.fixture
def start_worker(processes, broker_url) -> Callable[..., ProcfileProcess]:
    """`start_worker(**env)`: the Procfile's analytics worker with one pool process, consuming."""
    # Task messages a previous test left in the session's vhost name rows of a flushed database.
    with Connection(broker_url) as connection:
        declare_topology(connection)
        ANALYTICS_QUEUE.bind(connection.default_channel).purge()

    def start(**env: str) -> ProcfileProcess:
        return processes.start_analytics_worker(env=env)

    return start


@pytest.fixture
def start_notifier(processes) -> Callable[..., ProcfileProcess]:
    """`start_notifier(**env)`: the Procfile's notifier, consuming the notifications queue."""

    def start(**env: str) -> ProcfileProcess:
        return processes.start_consumer("notifier", NOTIFICATIONS_QUEUE_NAME, QUIET_WORKER, env=env)

    return start


@pytest.fixture
def start_vip_notifier(processes) -> Callable[..., ProcfileProcess]:
    """`start_vip_notifier(**env)`: the Procfile's notifier_vip, consuming the VIP notifications queue."""

    def start(**env: str) -> ProcfileProcess:
        return processes.start_consumer("notifier_vip", VIP_NOTIFICATIONS_QUEUE_NAME, QUIET_WORKER, env=env)

    return start


@pytest.fixture
def start_archiver(processes) -> Callable[..., ProcfileProcess]:
    """`start_archiver(**env)`: the Procfile's `dlq_archiver`, consuming `dead_letters`."""

    def start(**env: str) -> ProcfileProcess:
        return processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE.name, env=env)

    return start


@pytest.fixture
def start_relay(processes) -> Callable[..., ProcfileProcess]:
    """`start_relay(**env)`: the Procfile's relay polling every half second, listening."""

    def start(**env: str) -> ProcfileProcess:
        return processes.start_relay("--poll-seconds 0.5", env=env)

    return start


@pytest.fixture
def relay_process(processes) -> ProcfileProcess:
    """The Procfile's `relay` command, polling every second as a fallback to NOTIFY, listening."""
    return processes.start_relay("--poll-seconds 1")


@pytest.fixture
def live_daphne(transactional_db, tmp_path) -> Iterator[DaphneServer]:
    """A real daphne process serving the project against the test database.

    Its stdout and stderr go to `server.log_path`, for tests about what the server logs.
    """
    server = DaphneServer(port=free_port(), log_path=tmp_path / "daphne.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_web_tier(transactional_db, tmp_path) -> Iterator[Callable[..., WebTier]]:
    """`start_web_tier(**env)`: two web processes (the Procfile's `web`) behind the Procfile's `lb`
    (HAProxy), as `make run` starts them, returned once the load balancer sends connections to
    both; logs in the test's tmp_path."""
    tiers: list[WebTier] = []
    # Unix socket paths are limited to about 100 bytes; the test's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="chat-lb-") as run_root:

        def start(**env: str) -> WebTier:
            tier = WebTier(size=2, log_dir=tmp_path, extra_env=env)
            tiers.append(tier)
            try:
                tier.start(run_dir=Path(run_root) / str(len(tiers)))
            except procfile.ProcessNotReady as error:
                pytest.fail(str(error))
            return tier

        try:
            yield start
        finally:
            for tier in tiers:
                tier.stop()


@pytest.fixture
def web_tier(start_web_tier) -> WebTier:
    """Two web processes behind the load balancer (`start_web_tier`)."""
    return start_web_tier()
