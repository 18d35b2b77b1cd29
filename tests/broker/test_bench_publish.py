"""`manage.py bench_publish` runs both paths and leaves nothing behind."""

from __future__ import annotations

import io
import json
import sys

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from messaging.models import OutboxEvent

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]


def test_bench_publish_reports_both_paths_and_cleans_up(broker_url, send_messages):
    [real_event] = send_messages(1)
    out = io.StringIO()

    call_command("bench_publish", count=450, repeat=1, json=True, stdout=out)

    report = json.loads(out.getvalue())
    assert report["count"] == 450
    assert report["outbox_messages"] == 3  # 200 + 200 + 50 events, and not the real pending one
    assert report["seed_seconds"] > 0 and report["outbox_seconds"] > 0
    assert OutboxEvent.objects.get().pk == real_event.pk
    assert OutboxEvent.objects.get().sent_at is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bench_publish_%%'")
        assert cursor.fetchone() == (0,)


def test_bench_publish_without_pika_says_it_is_a_development_requirement(monkeypatch):
    monkeypatch.setitem(sys.modules, "pika", None)  # what a production install (no pika) looks like

    with pytest.raises(
        CommandError, match=r"needs pika, a development requirement: pip install -r requirements-dev"
    ):
        call_command("bench_publish", count=10, repeat=1)
