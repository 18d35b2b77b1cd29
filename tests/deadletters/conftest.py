"""Dead-letter tests: real archiver and worker processes (tests/harness.py) on this session's vhost.

Messages are built with the relay's own `task_message_build`, so they are the Celery protocol-2
messages the pipeline really carries.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import amqp
import pytest
from django.db import connection
from kombu import Connection

from bench.procfile import ProcfileProcess
from messaging.topology import CHAT_EVENTS_EXCHANGE
from messaging.wire import task_message_build
from tests.harness import wait_until

ROUTING_KEY = "chat.message.created"


def log_text(process: ProcfileProcess) -> str:
    return process.log_text()


def wait_for_log(process: ProcfileProcess, line: str, *, timeout: float = 60) -> None:
    """Wait for a line the test is about (what the archiver says it did), never for readiness."""

    def seen() -> bool:
        if process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode}; log:\n{process.log_text()[-3000:]}")
        return line in process.log_text()

    wait_until(
        seen, timeout=timeout, message=lambda: f"{line!r} not logged; log:\n{process.log_text()[-3000:]}"
    )


def chat_event(*, room_id: int, author_id: int, message_id: int = 1) -> dict[str, Any]:
    """A valid chat.message.created outbox payload."""
    return {
        "type": ROUTING_KEY,
        "event_id": str(uuid.uuid4()),
        "message_id": message_id,
        "room_id": room_id,
        "author_id": author_id,
        "created_at": datetime.now(UTC).isoformat(),
    }


def publish(
    broker_url: str,
    message: amqp.Message,
    *,
    exchange: str = CHAT_EVENTS_EXCHANGE.name,
    routing_key: str = ROUTING_KEY,
    copies: int = 1,
) -> None:
    """Publish with a confirm, so the message is in its queue when this returns; `copies` publishes
    that many byte-identical messages on one channel, so that they die in the same second."""
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        for _ in range(copies):
            channel.basic_publish_confirm(message, exchange=exchange, routing_key=routing_key, mandatory=True)


def analytics_task_message(events: list[Any], *, expiration_ms: int | None = None) -> amqp.Message:
    message = task_message_build(routing_key=ROUTING_KEY, rows=[(1, e) for e in events] or [(1, {})]).message
    if expiration_ms is not None:
        message.properties["expiration"] = str(expiration_ms)
    return message


def queue_depth(broker_url: str, queue: str) -> int:
    with Connection(broker_url) as conn:
        _, ready, _ = conn.default_channel.queue_declare(queue, passive=True)
        return ready


@pytest.fixture(autouse=True)
def _empty_queues(request: pytest.FixtureRequest) -> None:
    """Broker tests share the session's vhost: start each with every topology queue empty."""
    if request.node.get_closest_marker("broker") is None:
        return
    from messaging.topology import declared_queues

    broker_url = request.getfixturevalue("broker_url")
    with Connection(broker_url) as conn:
        for queue in declared_queues():
            conn.default_channel.queue_purge(queue.name)


# A header whose presence makes the database refuse a DeadLetter row, whatever its form.
REFUSED_HEADER = "x-test-refused"


@pytest.fixture
def refuse_dead_letters(django_db_blocker) -> Iterator[Callable[..., None]]:
    """`refuse_dead_letters(sqlstate)`: from then on, inserting a DeadLetter row whose headers hold
    REFUSED_HEADER fails with that SQLSTATE (a trigger), full row and minimal row alike.
    `refuse_dead_letters(None)` lifts it. In a transactional_db test, child processes see it too."""

    def drop(cursor) -> None:
        cursor.execute("DROP TRIGGER IF EXISTS test_refuse_dead_letter ON deadletters_deadletter")
        cursor.execute("DROP FUNCTION IF EXISTS test_refuse_dead_letter()")

    def refuse(sqlstate: str | None = "P0001") -> None:
        with connection.cursor() as cursor:
            drop(cursor)
            if sqlstate is None:
                return
            cursor.execute(
                "CREATE FUNCTION test_refuse_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.headers ? '{REFUSED_HEADER}' THEN "
                "RAISE EXCEPTION 'test: this row is refused' USING ERRCODE = TG_ARGV[0]; "
                "END IF; RETURN NEW; END $$"
            )
            cursor.execute(
                "CREATE TRIGGER test_refuse_dead_letter BEFORE INSERT ON deadletters_deadletter "
                f"FOR EACH ROW EXECUTE FUNCTION test_refuse_dead_letter('{sqlstate}')"
            )

    yield refuse
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        drop(cursor)


def x_death(
    *, queue: str = "analytics", reason: str = "rejected", count: int = 1, when: datetime | None = None
) -> list[dict[str, Any]]:
    """The x-death header RabbitMQ adds, as py-amqp decodes it."""
    return [
        {
            "count": count,
            "reason": reason,
            "queue": queue,
            "time": (when or datetime.now(UTC)).replace(microsecond=0),
            "exchange": CHAT_EVENTS_EXCHANGE.name,
            "routing-keys": [ROUTING_KEY],
        }
    ]


def archive_letter(
    *, task_id: str | None = None, reason: str = "rejected", queue: str = "analytics", **extra: Any
):
    """Archive a dead letter as the archiver would receive it (no broker involved)."""
    from deadletters.services.archive import dead_letter_archive

    message = analytics_task_message([chat_event(room_id=1, author_id=1)])
    headers = dict(message.properties["application_headers"])
    if task_id:
        headers["id"] = task_id
    headers["x-death"] = x_death(queue=queue, reason=reason)
    headers["x-first-death-queue"] = queue
    headers["x-first-death-reason"] = reason
    properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
    return dead_letter_archive(
        body=message.body, headers=headers, properties={**properties, **extra}
    ).dead_letter
