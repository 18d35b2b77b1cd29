"""Retries with a countdown on quorum queues: Celery's native delayed delivery, set up once per
connection through the node the worker uses.

A task retried with backoff (messaging/retrying.py) is published again with a countdown. On classic
queues the worker holds such a message until it is due, raising its prefetch with a global QoS;
quorum queues refuse a global QoS, so with BROKER_QUEUE_TYPE=quorum Celery publishes it to
RabbitMQ's `celery_delayed_*` exchanges instead, whose TTL queues (quorum too) hand it back to the
task's exchange when due. The worker declares those exchanges and queues, and binds the exchanges
of the queues it consumes to them, each time it connects.

Celery's own step does that through every node of a failover URL in turn, retrying a node that is
down for about ten seconds, with the worker not consuming meanwhile: so every failover stalled the
worker. A cluster shares its exchanges, queues and bindings, so this step declares them once,
through the node the worker just connected to. It binds only the queues this worker consumes (a
retry goes back to its task's queue, whose workers set it up), and none on a direct exchange,
which delayed delivery cannot route to: the monitoring queue's beat tasks never retry.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)
from kombu.utils.url import maybe_sanitize_url

logger = logging.getLogger(__name__)


class NodeDelayedDelivery(DelayedDelivery):
    """Replaces Celery's DelayedDelivery step (messaging/worker_intake.py's blueprint); included,
    like it, only when some queue is a quorum queue."""

    def start(self, c: Consumer) -> None:
        node = c.connection.as_uri(include_password=True)
        try:
            with c.app.connection_for_write(url=node) as connection:
                declare_native_delayed_delivery_exchanges_and_queues(
                    connection, c.app.conf.broker_native_delayed_delivery_queue_type
                )
                for queue in c.app.amqp.queues.consume_from.values():
                    if queue.exchange.type != "direct":
                        bind_queue_to_native_delayed_delivery_exchange(connection, queue)
        except Exception as error:  # the worker consumes on; only a retry with a countdown would fail
            logger.error(
                "could not set up delayed delivery through %s (%s): retries with a countdown fail "
                "until the next connection sets it up",
                maybe_sanitize_url(node),
                error,
            )
