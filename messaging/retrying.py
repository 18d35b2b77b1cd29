"""The one Celery base task: every failure has an explicit outcome, retried with backoff or dead-lettered.

Every task that consumes an event uses it (analytics.tasks, chat.tasks):

    @shared_task(base=DeadLetteringTask, name=MESSAGE_CREATED.task_name, max_retries=12,
                 retry_for=(OperationalError,), reject_for=(InvalidEvent,),
                 retry_backoff=1, retry_backoff_max=60)
    def record_chat_events(events): ...

- `retry_for`: transient errors, retried by Celery's own autoretry: `retry_backoff` seconds doubling
  per attempt up to `retry_backoff_max`, each delay drawn from [0, that] (full jitter), `max_retries`
  times; Celery takes both in whole seconds. After the last retry the error propagates, the task
  fails, and (acks_on_failure_or_timeout=False) RabbitMQ dead-letters the message.
- `reject_for`: errors that can never succeed (an invalid payload): rejected at once without
  requeue, so dead-lettered without wasting retries.
- anything else is a bug: the task fails and is dead-lettered after one attempt.

In every case deadletters.worker_hooks records the task name, error class and message, traceback
and attempts for the dead-letter archive; docs/dead-letters.md has the table. Beat tasks do not use
it: a failed run is acked, and the next beat is its retry.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject

logger = logging.getLogger(__name__)


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
            # The errors name fields, never values (messaging.events): the line may be logged anywhere.
            logger.warning("dead-lettering %s: %s: %s", self.name, type(error).__name__, error)
            raise Reject(f"{type(error).__name__}: {error}", requeue=False) from error
