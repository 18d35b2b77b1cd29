"""An installation from before quorum queues, filled with messages of known ids, and what the
`migrate_queues` tests (tests/broker, tests/faults, tests/cluster) check it with.

The queues are declared as classic installations had them: the work and dead-letter queues
classic, the notifications queue a classic priority queue. The messages carry an `x-test-id`
header and every property a move must keep; the dead letters are real ones, with the x-death
headers RabbitMQ wrote.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass

import amqp
from kombu import Connection, Queue

from bench.procfile import ROOT, child_process_env
from messaging.events import MENTION
from messaging.topology import (
    ANALYTICS_QUEUE_NAME,
    CHAT_EVENTS_EXCHANGE,
    DEAD_LETTER_QUEUE_NAME,
    EXCHANGES,
    MONITORING_EXCHANGE,
    MONITORING_QUEUE_NAME,
    NOTIFICATIONS_QUEUE_NAME,
    WORK_QUEUE_ARGUMENTS,
    dead_letter_queue,
    declared_queues,
    work_queues,
)
from tests.faults.points import fault_env
from tests.harness import wait_until

TEST_ID_HEADER = "x-test-id"
# The classic notifications queue: strict priorities, up to 10.
CLASSIC_NOTIFICATIONS_QUEUE = Queue(
    NOTIFICATIONS_QUEUE_NAME,
    exchange=CHAT_EVENTS_EXCHANGE,
    routing_key=MENTION.routing_key,
    durable=True,
    queue_arguments={**WORK_QUEUE_ARGUMENTS, "x-max-priority": 10},
)


@dataclass(frozen=True)
class Sent:
    """A message as published: what the migrated queue must hand out again."""

    queue: str
    body: bytes
    properties: dict


def classic_installation_declare(broker_url: str) -> None:
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        for exchange in EXCHANGES:
            exchange.bind(channel).declare()
        for queue in (*work_queues(queue_type="classic"), dead_letter_queue(queue_type="classic")):
            queue.bind(channel).declare()
        CLASSIC_NOTIFICATIONS_QUEUE.bind(channel).declare()


def classic_installation_fill(
    broker_url: str, *, analytics: int = 250, notifications: int = 30, dead_letters: int = 20
) -> dict[str, Sent]:
    """Publish messages of known ids (confirmed) into the analytics, notifications and
    dead-letter queues; returns {id: what was sent}. Ids are unique across queues."""
    sent: dict[str, Sent] = {}
    with Connection(broker_url) as connection:
        # py-amqp's publish waits for each confirm once the channel is in confirm mode.
        channel = connection.channel()
        channel.confirm_select()
        for i in range(analytics):
            properties = {
                "content_type": "application/octet-stream",
                "content_encoding": "binary",
                "delivery_mode": 2,
                "priority": i % 10,
                "message_id": f"m-{i}",
                "application_headers": {TEST_ID_HEADER: f"a-{i}", "nested": {"n": i, "tags": ["x", "y"]}},
            }
            if i % 2 == 0:
                properties["expiration"] = "600000"
            # Not valid UTF-8: a move must copy bytes, not text.
            body = b"\xff\xfe" + i.to_bytes(4, "big")
            channel.basic_publish(
                amqp.Message(body, **properties),
                exchange=CHAT_EVENTS_EXCHANGE.name,
                routing_key="chat.message.created",
            )
            sent[f"a-{i}"] = Sent(ANALYTICS_QUEUE_NAME, body, properties)
        for i in range(notifications):
            properties = {
                "content_type": "application/json",
                "content_encoding": "utf-8",
                "delivery_mode": 2,
                "priority": 9 if i % 3 == 0 else 0,
                "expiration": "600000",
                "application_headers": {TEST_ID_HEADER: f"n-{i}"},
            }
            body = f'{{"notification": {i}}}'.encode()
            channel.basic_publish(
                amqp.Message(body, **properties),
                exchange=CHAT_EVENTS_EXCHANGE.name,
                routing_key=MENTION.routing_key,
            )
            sent[f"n-{i}"] = Sent(NOTIFICATIONS_QUEUE_NAME, body, properties)
        # Real dead letters: rejected from the monitoring queue, dead-lettered with x-death.
        for i in range(dead_letters):
            properties = {"delivery_mode": 2, "application_headers": {TEST_ID_HEADER: f"d-{i}"}}
            body = f"dead {i}".encode()
            channel.basic_publish(
                amqp.Message(body, **properties), exchange=MONITORING_EXCHANGE.name, routing_key="monitoring"
            )
            sent[f"d-{i}"] = Sent(DEAD_LETTER_QUEUE_NAME, body, properties)
        channel.close()
        channel = connection.channel()
        for _ in range(dead_letters):
            message = channel.basic_get(MONITORING_QUEUE_NAME)
            channel.basic_reject(message.delivery_tag, requeue=False)
        # Dead-lettering happens after the reject, inside the broker.
        wait_until(
            lambda: channel.queue_declare(DEAD_LETTER_QUEUE_NAME, passive=True).message_count == dead_letters,
            timeout=30,
            message="the rejected messages did not all reach the dead-letter queue",
        )
    return sent


def queue_drain(broker_url: str, queue: str) -> list[amqp.Message]:
    """Every message `queue` holds now, consumed without ack (so removed), bodies as bytes."""
    with Connection(broker_url) as connection:
        channel = connection.channel()
        channel.auto_decode = False
        _, count, _ = channel.queue_declare(queue, passive=True)
        received: list[amqp.Message] = []
        if count:
            channel.basic_consume(queue, callback=received.append, no_ack=True)
            while len(received) < count:
                try:
                    connection.drain_events(timeout=10)
                except TimeoutError as error:
                    raise AssertionError(f"{queue} held {count} messages but gave {len(received)}") from error
        return received


def quorum_settings(settings, broker_url: str) -> None:
    """What an installation moving to a cluster sets (the notifications queues follow it, so that
    a queue losing an argument, x-max-priority, is migrated too)."""
    settings.CELERY_BROKER_URL = broker_url
    settings.BROKER_QUEUE_TYPE = "quorum"


def migrate_queues_process(
    broker_url: str, *args: str, faults: dict[str, str] | None = None
) -> subprocess.Popen:
    """`manage.py migrate_queues` as a child moving to quorum queues, with fault points if given."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "migrate_queues", *args],
        cwd=ROOT,
        env={
            **child_process_env(),
            **(fault_env(faults) if faults else {}),
            "CELERY_BROKER_URL": broker_url,
            "BROKER_QUEUE_TYPE": "quorum",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def messages_by_id(broker_url: str) -> dict[str, list[tuple[str, amqp.Message]]]:
    """Every message in every declared queue, consumed, by its x-test-id."""
    found: dict[str, list[tuple[str, amqp.Message]]] = defaultdict(list)
    for queue in declared_queues():
        for message in queue_drain(broker_url, queue.name):
            found[message.headers.get(TEST_ID_HEADER)].append((queue.name, message))
    return found


def assert_kept(sent: Sent, queue: str, message: amqp.Message) -> None:
    assert queue == sent.queue
    assert message.body == sent.body
    for name, value in sent.properties.items():
        if name == "application_headers":
            assert {key: message.headers[key] for key in value} == value
        else:
            assert message.properties[name] == value, name
    if sent.queue == DEAD_LETTER_QUEUE_NAME:
        death = message.headers["x-death"][0]
        assert (death["queue"], death["reason"]) == (MONITORING_QUEUE_NAME, "rejected")


def assert_every_message_once(broker_url: str, sent: dict[str, Sent]) -> None:
    found = messages_by_id(broker_url)
    assert set(found) == set(sent)
    assert {test_id: len(copies) for test_id, copies in found.items() if len(copies) > 1} == {}
    for test_id, [(queue, message)] in found.items():
        assert_kept(sent[test_id], queue, message)
