"""Fixtures for the monitoring tests: a webhook receiver on localhost and /metrics parsing."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

# The browser fixtures, for the banner test.
from tests.e2e.conftest import browser, new_context, open_room  # noqa: F401


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 recording the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def about(self, key: str) -> list[dict]:
        return [body for body in self.bodies if body["alert"]["key"] == key]


@pytest.fixture
def webhook(settings) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver.thread.start()
    settings.ALERT_WEBHOOK_URL = receiver.url
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def scrape(client: Client | None = None) -> str:
    response = (client or Client()).get("/metrics", HTTP_HOST="localhost")
    assert response.status_code == 200
    return response.content.decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` in an exposition text, None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def metric_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


@pytest.fixture
def make_dead_letters(db) -> Callable[..., list]:
    """Archived dead letters as the archiver stores them (status new unless told)."""
    from deadletters.models import DeadLetter

    def make(count: int, *, status: str = DeadLetter.Status.NEW, died_at=None) -> list[DeadLetter]:
        died_at = died_at or timezone.now()
        return DeadLetter.objects.bulk_create(
            DeadLetter(
                fingerprint=uuid.uuid4().hex,
                origin_queue="analytics",
                reason="rejected",
                task_name="analytics.record_chat_events",
                error_class="InvalidEvent",
                first_death_at=died_at,
                last_death_at=died_at,
                status=status,
            )
            for _ in range(count)
        )

    return make
