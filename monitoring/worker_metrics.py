"""Task metrics of a Celery worker, served on the worker's own HTTP port.

Prometheus cannot read a worker through the web process, so each worker serves
http://<host>:<port>/metrics itself (port: `--metrics-port`, default WORKER_METRICS_PORT).

With the prefork pool, tasks run in child processes; their counters would be invisible to an
HTTP server in the parent. prometheus_client's multiprocess mode solves that: every process
writes its values to files in PROMETHEUS_MULTIPROC_DIR and the parent's endpoint adds them up.
The variable must be set before prometheus_client is first imported, and a worker sets Django
up (importing it) before even `celeryd_init`. The earliest hook is `user_preload_options`, sent
when the command line is parsed, which is why `--metrics-port` is a preload option and
`install_worker_metrics` is called from chatproject/celery.py at import. Each
worker gets a fresh directory of its own (WORKER_METRICS_DIR is wiped at start when set), so
two workers on one host never add up each other's counters.

This module must not import prometheus_client (or Django models) at import time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from celery import Celery, signals, states

logger = logging.getLogger(__name__)

_port: int | None = None
_started: dict[str, float] = {}  # task id -> monotonic start, in the process running the task
_own_dir: str | None = None  # a temporary directory to remove at shutdown
_DIR_PREFIX = "celery-metrics-"


def install_worker_metrics(app: Celery) -> None:
    """Add `--metrics-port` to `celery worker` and connect the metric signals (import time)."""
    app.user_options["preload"].add(
        click.Option(
            ["--metrics-port"],
            type=int,
            default=None,
            help="Port of this worker's Prometheus endpoint (default: WORKER_METRICS_PORT; 0 disables).",
        )
    )
    signals.user_preload_options.connect(
        _prepare_multiprocess_dir, weak=False, dispatch_uid="monitoring.init"
    )
    signals.worker_init.connect(_start_endpoint, weak=False, dispatch_uid="monitoring.endpoint")
    signals.worker_process_shutdown.connect(_child_exited, weak=False, dispatch_uid="monitoring.child")
    signals.worker_shutdown.connect(_remove_own_dir, weak=False, dispatch_uid="monitoring.shutdown")
    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="monitoring.prerun")
    signals.task_postrun.connect(_task_finished, weak=False, dispatch_uid="monitoring.postrun")
    signals.task_unknown.connect(_message_rejected, weak=False, dispatch_uid="monitoring.unknown")
    signals.task_rejected.connect(_message_rejected, weak=False, dispatch_uid="monitoring.rejected")


def _prepare_multiprocess_dir(sender: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    global _port, _own_dir
    if getattr(sender, "__name__", "") != "worker":
        return  # beat, inspect...: no tasks run there
    from django.conf import settings

    _port = (options or {}).get("metrics_port")
    if _port is None:
        _port = settings.WORKER_METRICS_PORT
    if "prometheus_client" in sys.modules:
        logger.error(
            "prometheus_client was imported before the worker started: "
            "task metrics of pool processes are lost"
        )
    path = settings.WORKER_METRICS_DIR
    if path:
        # Files of a previous run would be added to this run's counters.
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        _remove_dirs_of_dead_workers()
        path = _own_dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _remove_dirs_of_dead_workers() -> None:
    # A worker killed with SIGKILL never removes its directory; the pid in the name tells.
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_endpoint(**_: Any) -> None:
    # The parent process, before the pool forks: the HTTP thread stays in the parent only.
    from infrastructure.metrics_server import metrics_server_start
    from monitoring import metrics  # noqa: F401  (creates the instruments' files)
    from monitoring.collectors import multiprocess_registry

    metrics_server_start(port=_port or 0, name="worker", registry=multiprocess_registry())


def _child_exited(pid: int | None = None, **_: Any) -> None:
    # Drops the dead child's live gauges; its counters stay summed, as Prometheus expects.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def _remove_own_dir(**_: Any) -> None:
    if _own_dir:
        shutil.rmtree(_own_dir, ignore_errors=True)


def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.monotonic()


_OUTCOMES = {
    states.SUCCESS: "CELERY_TASKS_SUCCEEDED",
    states.FAILURE: "CELERY_TASKS_FAILED",
    states.RETRY: "CELERY_TASKS_RETRIED",
    states.REJECTED: "CELERY_TASKS_REJECTED",
}


def _task_finished(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    from monitoring import metrics

    name = getattr(sender, "name", None) or "unknown"
    started = _started.pop(task_id or "", None)
    if started is not None:
        metrics.CELERY_TASK_DURATION_SECONDS.labels(task=name).observe(time.monotonic() - started)
    counter = _OUTCOMES.get(state or "")
    if counter:
        getattr(metrics, counter).labels(task=name).inc()


def _message_rejected(message: Any = None, name: str | None = None, **_: Any) -> None:
    # The consumer refused a message before any task ran (unknown task name, undecodable body).
    from monitoring import metrics

    metrics.CELERY_TASKS_REJECTED.labels(task=name or "unknown").inc()
