"""/metrics of the web process: every project metric, with values from the real sources."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone
from kombu import Connection, Producer
from prometheus_client import REGISTRY

from chat import services
from chat.presence import presence_socket_close, presence_socket_open
from messaging.models import OutboxEvent
from messaging.publishing import EventPublisher, publish_pending_events
from messaging.topology import ANALYTICS_QUEUE, MONITORING_QUEUE
from monitoring.metrics import PROJECT_METRIC_NAMES
from tests.monitoring.conftest import metric_names, sample, scrape


@pytest.fixture(autouse=True)
def fresh_queue_reads(settings, broker_url):
    # Every scrape probes this session's vhost instead of reusing a cached read.
    settings.METRICS_QUEUE_CACHE_SECONDS = 0


def test_metrics_exposes_every_project_metric(db):
    names = metric_names(scrape())

    missing = [name for name in PROJECT_METRIC_NAMES if name not in names]
    assert missing == []
    # django-prometheus's request metrics come with it.
    assert "django_http_requests_total_by_method_total" in names


def test_committed_message_counts_as_stored(make_user, make_room, django_capture_on_commit_callbacks):
    alice = make_user("alice")
    room = make_room("general", members=(alice,))
    before = REGISTRY.get_sample_value("chat_messages_stored_total")

    with django_capture_on_commit_callbacks(execute=True):
        services.message_create(room=room, author=alice, text="hi", client_id=uuid.uuid4())

    assert REGISTRY.get_sample_value("chat_messages_stored_total") == before + 1


def test_resent_message_is_not_counted_again(make_user, make_room, django_capture_on_commit_callbacks):
    alice = make_user("alice")
    room = make_room("general", members=(alice,))
    client_id = uuid.uuid4()
    with django_capture_on_commit_callbacks(execute=True):
        services.message_create(room=room, author=alice, text="hi", client_id=client_id)
    before = REGISTRY.get_sample_value("chat_messages_stored_total")

    with django_capture_on_commit_callbacks(execute=True):
        services.message_create(room=room, author=alice, text="hi", client_id=client_id)

    assert REGISTRY.get_sample_value("chat_messages_stored_total") == before


def test_outbox_pending_count_and_oldest_age(db):
    now = timezone.now()
    for minutes_ago in (3, 0):  # written in time order, as ids are
        event = OutboxEvent.objects.create(
            event_id=uuid.uuid4(), routing_key="chat.message.created", payload={}
        )
        OutboxEvent.objects.filter(pk=event.pk).update(created_at=now - timedelta(minutes=minutes_ago))
    OutboxEvent.objects.create(
        event_id=uuid.uuid4(), routing_key="chat.message.created", payload={}, sent_at=now
    )

    text = scrape()

    assert sample(text, "chat_outbox_pending_events") == 2
    assert sample(text, "chat_outbox_oldest_pending_age_seconds") >= 180


def test_event_no_task_consumes_keeps_the_oldest_pending_age_growing(db, broker_url):
    # The relay never publishes it, so the OutboxLagging/OutboxStuck alerts fire on its age.
    unroutable = OutboxEvent.objects.create(event_id=uuid.uuid4(), routing_key="chat.renamed", payload={})
    OutboxEvent.objects.filter(pk=unroutable.pk).update(created_at=timezone.now() - timedelta(minutes=3))
    OutboxEvent.objects.create(
        event_id=uuid.uuid4(),
        routing_key="chat.message.created",
        payload={"message_id": 1, "room_id": 1, "author_id": 1, "seq": 1},
    )
    publisher = EventPublisher(broker_url)
    try:
        result = publish_pending_events(publisher=publisher)
    finally:
        publisher.close()
        with Connection(broker_url) as conn:
            ANALYTICS_QUEUE.bind(conn.channel()).purge()

    text = scrape()

    assert result.sent == 1
    assert sample(text, "chat_outbox_pending_events") == 1
    assert sample(text, "chat_outbox_oldest_pending_age_seconds") >= 180


def test_open_sockets_count_every_process_presence(db):
    before = sample(scrape(), "chat_open_sockets")
    # Two sockets of two users, as two web processes would record them.
    sockets = [(990001, f"specific.{uuid.uuid4().hex}"), (990002, f"specific.{uuid.uuid4().hex}")]
    for user_id, channel in sockets:
        async_to_sync(presence_socket_open)(user_id=user_id, channel_name=channel)
    try:
        during = sample(scrape(), "chat_open_sockets")
    finally:
        for user_id, channel in sockets:
            async_to_sync(presence_socket_close)(user_id=user_id, channel_name=channel)

    assert during == before + 2


def test_queue_depth_and_consumers_come_from_rabbitmq(db, broker_url):
    with Connection(broker_url) as conn:
        producer = Producer(conn.channel())
        for n in range(3):
            producer.publish({"n": n}, exchange=MONITORING_QUEUE.exchange, routing_key="monitoring")
        try:
            text = scrape()
        finally:
            MONITORING_QUEUE.bind(conn.channel()).purge()

    assert sample(text, "chat_queue_messages", queue="monitoring") == 3
    assert sample(text, "chat_queue_consumers", queue="monitoring") == 0
    assert sample(text, "chat_metrics_source_up", source="broker_queues") == 1


def test_unreachable_broker_drops_only_queue_metrics(db, settings):
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens on port 1

    text = scrape()

    assert sample(text, "chat_metrics_source_up", source="broker_queues") == 0
    assert sample(text, "chat_queue_messages", queue="analytics") is None
    assert sample(text, "chat_outbox_pending_events") == 0


def test_relay_round_is_timed(db, broker_url):
    OutboxEvent.objects.create(
        event_id=uuid.uuid4(),
        routing_key="chat.message.created",
        payload={"message_id": 1, "room_id": 1, "author_id": 1, "seq": 1},
    )
    before = REGISTRY.get_sample_value("chat_relay_publish_seconds_count")
    publisher = EventPublisher(broker_url)
    try:
        result = publish_pending_events(publisher=publisher)
    finally:
        publisher.close()
        with Connection(broker_url) as conn:
            ANALYTICS_QUEUE.bind(conn.channel()).purge()

    assert result.sent == 1
    assert REGISTRY.get_sample_value("chat_relay_publish_seconds_count") == before + 1


def test_metrics_refused_outside_the_allowed_networks(db, client):
    response = client.get("/metrics", HTTP_HOST="localhost", REMOTE_ADDR="203.0.113.7")

    assert response.status_code == 403


def test_metrics_with_a_token_answer_its_bearer_from_any_address(db, client, settings):
    settings.METRICS_BEARER_TOKEN = "s3cret-scrape-token"

    response = client.get(
        "/metrics",
        HTTP_HOST="localhost",
        REMOTE_ADDR="203.0.113.7",
        HTTP_AUTHORIZATION="Bearer s3cret-scrape-token",
    )

    assert response.status_code == 200
    assert "chat_messages_stored_total" in response.content.decode()


@pytest.mark.parametrize("authorization", ["", "Bearer wrong-token", "Basic s3cret-scrape-token"])
def test_metrics_with_a_token_refuse_any_other_request_even_from_loopback(
    db, client, settings, authorization
):
    settings.METRICS_BEARER_TOKEN = "s3cret-scrape-token"
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}

    response = client.get("/metrics", HTTP_HOST="localhost", REMOTE_ADDR="127.0.0.1", **headers)

    assert response.status_code == 403
