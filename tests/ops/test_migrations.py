"""Migrations: the models need none, and a database migrated before the restructuring keeps working."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from messaging.models import OutboxEvent

# The leaf of each app before OutboxEvent moved from chat to messaging.
BEFORE_THE_MOVE = [
    ("chat", "0005_notification_acknowledgement"),
    ("messaging", None),
]


@pytest.mark.django_db
def test_models_need_no_new_migration() -> None:
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db(transaction=True)
def test_a_database_migrated_before_the_move_keeps_its_outbox_rows_and_content_type() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE_THE_MOVE)
    old_state = executor.loader.project_state(BEFORE_THE_MOVE[:1]).apps
    old_outbox = old_state.get_model("chat", "OutboxEvent")
    event_id = uuid.uuid4()
    old_outbox.objects.create(event_id=event_id, routing_key="chat.message.created", payload={"n": 1})
    ContentType.objects.clear_cache()
    old_content_type = ContentType.objects.get(app_label="chat", model="outboxevent")

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert OutboxEvent.objects.get(event_id=event_id).payload == {"n": 1}
    ContentType.objects.clear_cache()
    moved = ContentType.objects.get(app_label="messaging", model="outboxevent")
    assert moved.pk == old_content_type.pk
    assert not ContentType.objects.filter(app_label="chat", model="outboxevent").exists()
