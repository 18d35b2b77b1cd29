"""The Celery worker's message intake (Celery's Consumer), changed in three ways: bad messages are
dead-lettered, no log line quotes a message's body or headers, and after a failover the worker
consumes at once.

Stock Celery logs a message whose body cannot be decoded and then ACKS it, so it vanishes. Our
work queues name a dead-letter exchange for exactly this case: rejecting it without requeue
keeps it in `dead_letters` for a person to look at, and never loops. Selected by
CELERY_WORKER_CONSUMER in chatproject/settings.py.

Stock Celery also writes the body (up to 1 KiB) and headers of an unknown, unregistered or invalid
task message into its log. A message may carry chat text anywhere, and logs must never hold it; the
dead letter keeps the whole message for a person with access to the admin, so the log names only
the task, its id and the body's size.

With quorum queues, Celery sets up its native delayed delivery (the exchanges and queues that carry
retries with a countdown) each time the worker connects, before it consumes, and it does so through
every URL of a failover list, retrying an unreachable one for about 17 s. On a cluster those
exchanges, queues and bindings belong to the whole cluster, so once a node died every reconnecting
worker would stand idle that long for nothing; they are set up through the node it connected to.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer
from celery.worker.consumer import consumer as celery_consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery

logger = logging.getLogger(__name__)

CELERY_DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class ConnectedNodeDelayedDelivery(DelayedDelivery):
    """Celery's DelayedDelivery step, through the node the worker has just connected to only."""

    def start(self, c: Consumer) -> None:
        self._validate_configuration(c.app)
        node = c.connection.as_uri(include_password=True)
        try:
            self._setup_delayed_delivery(c, node)
        # Celery's own step only logs as well: without it a retry with a countdown fails to
        # publish (and is dead-lettered), while everything else keeps working.
        except Exception as error:
            logger.warning(
                "setting up native delayed delivery through %s failed: %s",
                c.connection.as_uri(),
                error,
            )


class DeadLetteringIntake(Consumer):
    class Blueprint(Consumer.Blueprint):
        default_steps = [
            "messaging.worker_intake:ConnectedNodeDelayedDelivery"
            if step == CELERY_DELAYED_DELIVERY_STEP
            else step
            for step in Consumer.Blueprint.default_steps
        ]

    def on_decode_error(self, message, exc: Exception) -> None:
        headers = message.headers or {}
        logger.critical(
            "dead-lettering a message whose body cannot be decoded: %s [task:%r id:%r type:%r "
            "encoding:%r, %d bytes]",
            type(exc).__name__,
            headers.get("task"),
            headers.get("id"),
            message.content_type,
            message.content_encoding,
            len(message.body or b""),
        )
        message.reject_log_error(logger, self.connection_errors, requeue=False)


# Celery's own lines for messages it cannot run, each quoting the body and headers: what each says instead.
_BODY_QUOTING_LINES = {
    celery_consumer.UNKNOWN_FORMAT: "rejected a message that is no task message; it is dead-lettered",
    celery_consumer.UNKNOWN_TASK_ERROR: "rejected a message for an unregistered task; it is dead-lettered",
    celery_consumer.INVALID_TASK_ERROR: "rejected an invalid task message; it is dead-lettered",
}


class MessageContentsFilter(logging.Filter):
    """Rewrites Celery's body-quoting log lines (see the module docstring) to say only what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        replacement = _BODY_QUOTING_LINES.get(record.msg) if isinstance(record.msg, str) else None
        if replacement is not None:
            record.msg, record.args = replacement, ()
            # The exception's text and traceback may quote the body as well.
            record.exc_info = record.exc_text = None
        return True


logging.getLogger(celery_consumer.__name__).addFilter(MessageContentsFilter())
