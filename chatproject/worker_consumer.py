"""The Celery worker's message consumer, changed in one way: undecodable messages are dead-lettered.

Stock Celery logs a message whose body cannot be decoded and then ACKS it, so it vanishes. Our
work queues name a dead-letter exchange for exactly this case: rejecting it without requeue
keeps it in `dead_letters` for a person to look at, and never loops. Selected by
CELERY_WORKER_CONSUMER in chatproject/settings.py.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


class DeadLetteringConsumer(Consumer):
    def on_decode_error(self, message, exc: Exception) -> None:
        logger.critical(
            "dead-lettering a message whose body cannot be decoded: %r [type:%r encoding:%r headers:%r]",
            exc,
            message.content_type,
            message.content_encoding,
            message.headers,
        )
        message.reject_log_error(logger, self.connection_errors, requeue=False)
