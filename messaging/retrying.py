"""A Celery base task whose every failure has an explicit outcome: retry with backoff, or dead letter.

    @app.task(base=DeadLetteringTask, bind=True, name="...", max_retries=8,
              retry_for=(OperationalError,), reject_for=(InvalidEvent,))
    def my_task(self, ...): ...

- `retry_for`: transient errors, retried with exponential backoff and full jitter
  (`retry_backoff` seconds doubling per attempt up to `retry_backoff_max`, `max_retries` times;
  all three are per-task decorator options). After the last retry the error propagates, the task
  fails, and (acks_on_failure_or_timeout=False) RabbitMQ dead-letters the message.
- `reject_for`: errors that can never succeed (invalid payload): rejected at once without requeue,
  so dead-lettered without wasting retries.
- anything else is a bug: the task fails and is dead-lettered after one attempt.

In every case worker_hooks records the task name, error class and message, traceback and
attempts for the dead-letter archive.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Reject


class DeadLetteringTask(Task):
    abstract = True
    retry_for: tuple[type[BaseException], ...] = ()
    reject_for: tuple[type[BaseException], ...] = ()
    max_retries = 5
    # Celery's own backoff (celery.utils.time.get_exponential_backoff_interval): base * 2**retries,
    # capped, then a uniform draw in [0, that] so that workers failing together do not retry together.
    retry_backoff: int | bool = 1
    retry_backoff_max = 60
    retry_jitter = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery builds its autoretry wrapper from `autoretry_for`; keep the clearer name here.
        if cls.retry_for and not getattr(cls, "autoretry_for", ()):
            cls.autoretry_for = tuple(cls.retry_for)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except self.reject_for as error:
            raise Reject(f"{type(error).__name__}: {error}", requeue=False) from error
