"""The Celery worker's message intake (Celery's Consumer), changed in three ways: bad messages are
dead-lettered, no log line quotes a message's body or headers, and on a cluster a worker that lost
its node consumes again as soon as it has reconnected to another.

Stock Celery logs a message whose body cannot be decoded and then ACKS it, so it vanishes. Our
work queues name a dead-letter exchange for exactly this case: rejecting it without requeue
keeps it in `dead_letters` for a person to look at, and never loops. Selected by
CELERY_WORKER_CONSUMER in chatproject/settings.py.

Stock Celery also writes the body (up to 1 KiB) and headers of an unknown, unregistered or invalid
task message into its log. A message may carry chat text anywhere, and logs must never hold it; the
dead letter keeps the whole message for a person with access to the admin, so the log names only
the task, its id and the body's size.

With quorum queues, Celery declares its native delayed delivery (the celery_delayed_* queues, where
a retry's countdown waits instead of in a worker's memory) each time the worker (re)connects, and
does so through every node of a failover URL in turn, as if each were a broker of its own, giving a
node that is down four tries and some 17 seconds. After losing a node, every worker reconnected to
another at once but consumed only that much later. A cluster shares its exchanges, queues and
bindings, so `NodeDelayedDelivery` declares them once, through the node the worker is connected to.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer
from celery.worker.consumer import consumer as celery_consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

logger = logging.getLogger(__name__)


class NodeDelayedDelivery(DelayedDelivery):
    """Celery's DelayedDelivery step (included with quorum queues), declared through the node the
    worker's consumer is connected to only."""

    def start(self, c: Consumer) -> None:
        url = c.connection.as_uri(include_password=True)  # the node failover chose
        try:
            with c.app.connection_for_write(url=url) as connection:
                declare_native_delayed_delivery_exchanges_and_queues(
                    connection, c.app.conf.broker_native_delayed_delivery_queue_type
                )
                for queue in c.app.amqp.queues.values():
                    bind_queue_to_native_delayed_delivery_exchange(connection, queue)
        except Exception as error:  # as Celery's own: the worker runs on, retries' countdowns held in memory
            logger.warning("native delayed delivery is not set up: %s: %s", type(error).__name__, error)


_CELERY_DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class DeadLetteringIntake(Consumer):
    class Blueprint(Consumer.Blueprint):
        default_steps = [
            "messaging.worker_intake:NodeDelayedDelivery" if step == _CELERY_DELAYED_DELIVERY else step
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
