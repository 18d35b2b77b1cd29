"""Celery signal receivers that record why a task failed for good, before its message is dead-lettered.

Only parsing here; `task_failure_record` (services/task_failures.py) does the write. Which signal covers what:
- task_failure: the task raised (retries exhausted, or a bug). With acks_late and
  acks_on_failure_or_timeout=False the pool parent rejects the message without requeue once the
  child returns, so the row is committed before the dead letter exists.
- task_postrun with state REJECTED: the task raised Reject(requeue=False) (invalid payload),
  in the pool child, where the real cause (`raise Reject(...) from error`) is still known. Same
  ordering as above: the parent rejects after the child returned.
- task_unknown / task_rejected: the worker's intake rejected a message naming no registered
  task, or an invalid one. Celery sends these AFTER the reject, so the archiver may store the
  dead letter first; the service's join handles both orders.
"""

from __future__ import annotations

import logging
import traceback as traceback_module
from typing import Any

from celery import signals, states
from celery.exceptions import NotRegistered, Reject

logger = logging.getLogger(__name__)


def connect() -> None:
    signals.task_failure.connect(on_task_failure, weak=False, dispatch_uid="deadletters.task_failure")
    signals.task_postrun.connect(on_task_postrun, weak=False, dispatch_uid="deadletters.task_postrun")
    signals.task_unknown.connect(on_task_unknown, weak=False, dispatch_uid="deadletters.task_unknown")
    signals.task_rejected.connect(on_task_rejected, weak=False, dispatch_uid="deadletters.task_rejected")


def on_task_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    if isinstance(exception, Reject):
        # Celery also sends task_failure for Reject(requeue=False), from the pool parent where only
        # a remote traceback is left; the child's task_postrun already recorded the real cause.
        return
    _record(task_id, getattr(sender, "name", ""), exception, _attempts(sender))


def on_task_postrun(
    sender: Any = None, task_id: str | None = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    if state != states.REJECTED or not isinstance(retval, Reject) or retval.requeue:
        return
    # The task raises Reject(...) from the real error; the cause says what went wrong.
    cause = retval.__cause__ or retval
    _record(task_id, getattr(sender, "name", ""), cause, _attempts(sender), reject_reason=retval.reason)


def on_task_unknown(
    sender: Any = None,
    name: str | None = None,
    id: str | None = None,
    exc: BaseException | None = None,
    **_: Any,
) -> None:
    # Celery's exc is the registry's KeyError; NotRegistered is what it means.
    _record(
        id,
        name or "",
        NotRegistered(name),
        None,
        error_message=f"no task named {name!r} is registered in the worker",
    )


def on_task_rejected(
    sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any
) -> None:
    headers = getattr(message, "headers", None) or {}
    _record(headers.get("id"), headers.get("task") or "", exc, None)


def _attempts(task: Any) -> int | None:
    request = getattr(task, "request", None)
    retries = getattr(request, "retries", None)
    return None if retries is None else int(retries) + 1


def _record(
    task_id: str | None,
    task_name: str,
    error: BaseException | None,
    attempts: int | None,
    *,
    reject_reason: Any = None,
    error_message: str | None = None,
) -> None:
    if not task_id:
        return
    from deadletters.services.task_failures import task_failure_publish, task_failure_record

    if error is not None:
        error_class = f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins.")
        message = error_message or str(error) or str(reject_reason or "")
        trace = "".join(traceback_module.format_exception(error))
    else:
        error_class, message, trace = "", error_message or str(reject_reason or ""), ""
    failure = {
        "task_id": task_id,
        "task_name": task_name,
        "error_class": error_class,
        "error_message": message,
        "traceback": trace,
        "attempts": attempts,
    }
    try:
        task_failure_record(**failure)
        return
    except Exception as error:  # a database outage must not turn a dead letter into a crashed worker
        db_error = error
    # Retries run out mostly because the database is down, exactly when the row cannot be written:
    # then the details go to the archiver through the broker, ahead of the dead letter itself.
    try:
        task_failure_publish(**failure)
        logger.warning(
            "database unavailable (%s); sent the failure of %s[%s] to the archiver",
            db_error,
            task_name,
            task_id,
        )
    except Exception:
        logger.exception(
            "could not record the failure of task %s[%s] (database: %s)", task_name, task_id, db_error
        )
