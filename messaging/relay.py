"""The outbox relay (`manage.py run_relay`): moves committed outbox rows to RabbitMQ without losing any.

Each round publishes everything pending (messaging/publishing.py: confirmed, then marked sent, so a
crash anywhere means a resend, never a loss; the tasks are idempotent on `event_id`), then sleeps
until a NOTIFY or the fallback poll (messaging/listening.py). Connecting, heartbeats while idle,
backoff, state logging, hourly pruning and shutdown are the broker loop's (messaging/loop.py).

Events whose routing key no task consumes are never published and never dropped: the relay names
them in its log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.conf import settings

from messaging.listening import OutboxListener, events_wait
from messaging.loop import BrokerLoop
from messaging.outbox import prune_sent_events, unroutable_pending_events
from messaging.publishing import BATCHES_PER_ROUND, EventPublisher, publish_pending_events

logger = logging.getLogger(__name__)

# How often the caught-up relay looks for pending events no task consumes (a cheap read then).
UNROUTABLE_CHECK_SECONDS = 60.0


class UnroutableEvents:
    """Names each routing key no task consumes once while its events stay pending, not every check."""

    def __init__(self) -> None:
        self.routing_keys: set[str] = set()

    def report(self, pending_by_key: dict[str, int]) -> None:
        for routing_key in sorted(pending_by_key.keys() - self.routing_keys):
            logger.error(
                "%d outbox events with routing key %r stay pending: no task consumes it "
                "(EVENT_TASKS in messaging/events.py); they are kept, not published, until one does",
                pending_by_key[routing_key],
                routing_key,
            )
        for routing_key in sorted(self.routing_keys - pending_by_key.keys()):
            logger.info("no outbox events with routing key %r are pending any more", routing_key)
        self.routing_keys = set(pending_by_key)


class OutboxRelay(BrokerLoop):
    """Publishes everything pending, then sleeps until a NOTIFY or `poll_seconds` pass."""

    name = "relay"
    waiting = "events wait in the outbox"

    def __init__(
        self,
        *,
        broker_url: str | None = None,
        poll_seconds: float | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.publisher = EventPublisher(broker_url, heartbeat=settings.RELAY_HEARTBEAT_SECONDS)
        super().__init__(
            broker_url=self.publisher.broker_url,
            heartbeat=settings.RELAY_HEARTBEAT_SECONDS,
            should_stop=should_stop,
        )
        self.poll_seconds = poll_seconds if poll_seconds is not None else settings.OUTBOX_POLL_SECONDS
        self.listener = OutboxListener()
        self.unroutable = UnroutableEvents()
        self.next_unroutable_check = time.monotonic()
        self.failed = False  # the last round left nacked or unroutable events pending

    def connect(self) -> None:
        # LISTEN before reading, so an event committed in between still wakes us.
        self.listener.connect()
        self.publisher.connect()

    def broker_node(self) -> str:
        return self.publisher.node

    def work(self) -> bool:
        while not self.should_stop():
            result = publish_pending_events(publisher=self.publisher)
            self.failed = bool(result.failed)
            if result.failed or result.selected < settings.OUTBOX_BATCH_SIZE * BATCHES_PER_ROUND:
                break
        if time.monotonic() >= self.next_unroutable_check:
            self.unroutable.report(unroutable_pending_events())
            self.next_unroutable_check = time.monotonic() + UNROUTABLE_CHECK_SECONDS
        return True

    def idle_wait(self) -> None:
        # Nacked or unroutable events are retried on the next poll, not in a hot loop.
        events_wait(
            seconds=min(self.poll_seconds, 1.0) if self.failed else self.poll_seconds,
            listener=self.listener,
            publisher=self.publisher,
        )

    def keep_alive(self) -> None:
        self.publisher.keep_alive()

    def prune(self, *, between_chunks: Callable[[], None]) -> None:
        pruned = prune_sent_events(between_chunks=between_chunks)
        if pruned:
            logger.info("pruned %d sent outbox events", pruned)

    def close(self, *, broken: bool) -> None:
        # A publisher whose connection failed has already dropped it.
        self.publisher.close()
        self.listener.close()


def relay_run(
    *,
    broker_url: str | None = None,
    poll_seconds: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run the relay until `should_stop()` (or SIGTERM, with messaging.loop.stop_on_sigterm)."""
    OutboxRelay(broker_url=broker_url, poll_seconds=poll_seconds, should_stop=should_stop).run()
