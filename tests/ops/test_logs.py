"""No log line of any process carries message text, email bodies, reset tokens or session keys.

Mentions (a socket push and an email), a password reset and poison messages go through the real
processes (daphne, relay, analytics worker, notifier, dead-letter archiver), each logging to a file
as in production; every log file is then searched for the secrets the traffic carried. Mail goes
to files (EMAIL_URL=filemail://), so the tests read the email the processes really sent.
"""

from __future__ import annotations

import base64
import json
import random
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import HTTPCookieProcessor, Request, build_opener

import amqp
import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from kombu import Connection
from websockets.sync.client import connect as websocket_connect

from analytics.models import ProcessedEvent
from bench.procfile import DaphneServer, free_port
from chat.models import Message, NotificationDelivery
from deadletters.models import DeadLetter
from messaging.events import MENTION, MESSAGE_CREATED
from messaging.topology import (
    ANALYTICS_QUEUE,
    CHAT_EVENTS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    NOTIFICATIONS_QUEUE_NAME,
    declare_topology,
)
from messaging.wire import task_message_build
from tests.conftest import session_cookie
from tests.harness import QUIET_WORKER, wait_until
from tests.mail import file_email_env

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-1"


@pytest.fixture(autouse=True)
def _user_ids_of_this_run() -> None:
    """User ids name Redis presence keys and `user.<id>` groups; concurrent runs must not share them."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval('auth_user_id_seq', %s)", [random.randrange(10**6, 10**9)])


@pytest.fixture
def mail_dir(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.mkdir()
    return path


@pytest.fixture
def mail_env(mail_dir: Path) -> dict[str, str]:
    return file_email_env(mail_dir)


@pytest.fixture
def web(tmp_path: Path, mail_env: dict[str, str], transactional_db) -> Iterator[DaphneServer]:
    server = DaphneServer(port=free_port(), log_path=tmp_path / "daphne.log", extra_env=mail_env)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workers(broker_url, processes, mail_env) -> None:
    """The Procfile's analytics worker, notifier and dead-letter archiver, once each consumes its queue."""
    with Connection(broker_url) as conn:
        declare_topology(conn)
        # The vhost is the session's: an earlier test may have left a message behind, which these
        # consumers would log and archive too.
        for queue in (ANALYTICS_QUEUE.name, NOTIFICATIONS_QUEUE_NAME, DEAD_LETTER_QUEUE.name):
            conn.default_channel.queue_purge(queue)
    # No metrics endpoint: the Procfile's ports belong to whichever test runs a worker meanwhile.
    processes.start_consumer("worker", ANALYTICS_QUEUE.name, QUIET_WORKER, env=mail_env)
    processes.start_consumer("notifier", NOTIFICATIONS_QUEUE_NAME, QUIET_WORKER, env=mail_env)
    processes.start_consumer("dlq_archiver", DEAD_LETTER_QUEUE.name)


def log_files(tmp_path: Path) -> list[Path]:
    files = sorted(tmp_path.glob("*.log"))
    assert files, "no process wrote a log file"
    return files


def leaks(tmp_path: Path, secrets: dict[str, str]) -> list[str]:
    """`what (value) in file` for every secret found in any process's log."""
    found = []
    for path in log_files(tmp_path):
        text = path.read_text(errors="replace")
        found += [f"{what} ({value!r}) in {path.name}" for what, value in secrets.items() if value in text]
    return found


def session_keys() -> dict[str, str]:
    return {
        f"session key {i}": key for i, key in enumerate(Session.objects.values_list("session_key", flat=True))
    }


def mails(mail_dir: Path) -> list:
    return [
        message_from_bytes(path.read_bytes(), policy=policy.default) for path in sorted(mail_dir.iterdir())
    ]


class Browser:
    """Forms over real HTTP with cookies and CSRF, as a browser posts them."""

    def __init__(self, server: DaphneServer) -> None:
        self.server = server
        self.cookies = CookieJar()
        self.opener = build_opener(HTTPCookieProcessor(self.cookies))

    def get(self, path: str) -> str:
        with self.opener.open(self.server.http_url + path, timeout=10) as response:
            return response.read().decode()

    def post(self, path: str, fields: dict[str, str]) -> str:
        """Posts the form at `path` (fetched first for its CSRF cookie); returns the final URL."""
        self.get(path)
        csrf = next(cookie.value for cookie in self.cookies if cookie.name == "csrftoken")
        data = urlencode({"csrfmiddlewaretoken": csrf, **fields}).encode()
        request = Request(self.server.http_url + path, data=data, headers={"Referer": self.server.http_url})
        with self.opener.open(request, timeout=10) as response:
            return response.url

    def cookie(self, name: str) -> str:
        return next(cookie.value for cookie in self.cookies if cookie.name == name)


def room_socket(server: DaphneServer, slug: str, sessionid: str):
    return websocket_connect(
        f"{server.ws_url}/ws/rooms/{slug}/",
        origin=f"http://127.0.0.1:{server.port}",
        additional_headers={"Cookie": f"sessionid={sessionid}"},
        open_timeout=10,
    )


def next_frame(socket, kind: str) -> dict:
    while True:
        frame = json.loads(socket.recv(timeout=30))
        if frame.get("type") == kind:
            return frame


def test_mentions_leave_no_message_text_or_email_in_any_log(
    web, workers, relay_process, make_user, make_room, mail_dir, tmp_path
):
    alice = make_user("alice", email="alice@example.com")  # offline: mentioned by email
    bob, carol = make_user("bob"), make_user("carol")  # carol online: mentioned on her socket
    make_room("hideout", is_private=True, members=(alice, bob, carol))
    browser = Browser(web)
    browser.post("/accounts/login/", {"username": "bob", "password": PASSWORD})
    text = f"@alice @carol the vault code is {uuid.uuid4().hex}"

    with room_socket(web, "hideout", session_cookie(carol)) as carol_socket:
        with room_socket(web, "hideout", browser.cookie("sessionid")) as bob_socket:
            bob_socket.send(json.dumps({"type": "message", "text": text, "client_id": str(uuid.uuid4())}))
            next_frame(bob_socket, "message")  # the author's acknowledgement
        assert next_frame(carol_socket, "notification")["text"] == text
    message = Message.objects.get(text=text)
    wait_until(
        lambda: NotificationDelivery.objects.filter(user=alice, channel="email").exists() and mails(mail_dir),
        timeout=60,
        message="the notifier sent alice no email",
    )
    wait_until(
        lambda: ProcessedEvent.objects.filter(message_id=message.pk).exists(),
        timeout=60,
        message="the analytics worker did not count the message",
    )
    [email] = mails(mail_dir)
    body = email.get_body().get_content()
    assert text in body

    assert leaks(tmp_path, {"message text": text, "email subject": email["Subject"], **session_keys()}) == []


RESET_LINK = re.compile(r"/accounts/reset/(?P<uid>[\w-]+)/(?P<token>[\w-]+)/")


def test_password_reset_leaves_no_token_or_email_in_any_log(web, make_user, mail_dir, tmp_path):
    alice = make_user("alice", email="alice@example.com")
    browser = Browser(web)

    browser.post("/accounts/password_reset/", {"email": "alice@example.com"})
    [email] = wait_until(lambda: mails(mail_dir), timeout=30, message="no password reset email was sent")
    link = RESET_LINK.search(email.get_body().get_content())
    assert link, "the email carries no reset link"
    set_password = browser.get(link.group(0))  # redirects to .../set-password/
    assert "new_password1" in set_password
    new_password = f"new-{uuid.uuid4().hex}"
    browser.post(
        f"/accounts/reset/{link['uid']}/set-password/",
        {"new_password1": new_password, "new_password2": new_password},
    )
    alice.refresh_from_db()
    assert alice.check_password(new_password)

    secrets = {
        "reset token": link["token"],
        "reset uid": link["uid"],
        "new password": new_password,
        **session_keys(),
    }
    assert leaks(tmp_path, secrets) == []


def poison_messages(secret: Callable[[str], str]) -> list[tuple[str, amqp.Message]]:
    """(routing key, message) for each way a worker refuses a message, with secrets where text could be."""
    now = datetime.now(UTC)
    invalid_event = {
        "type": MESSAGE_CREATED.routing_key,
        "event_id": secret("analytics event"),
        "created_at": now.isoformat(),
    }
    invalid_mention = {
        "event_id": str(uuid.uuid4()),
        "user_id": secret("mention event"),
        "message_id": 1,
        "queued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=5)).isoformat(),
    }
    undecodable = task_message_build(routing_key=MESSAGE_CREATED.routing_key, rows=[(1, {})]).message
    undecodable.body = b"\xff" + secret("undecodable body").encode()
    undecodable.properties["application_headers"]["argsrepr"] = secret("undecodable argsrepr")
    unregistered = task_message_build(
        routing_key=MESSAGE_CREATED.routing_key, rows=[(1, {"text": secret("unregistered body")})]
    ).message
    unregistered.properties["application_headers"]["task"] = "analytics.no_such_task"
    unregistered.properties["application_headers"]["argsrepr"] = secret("unregistered argsrepr")
    return [
        (
            MESSAGE_CREATED.routing_key,
            task_message_build(routing_key=MESSAGE_CREATED.routing_key, rows=[(1, invalid_event)]).message,
        ),
        (
            MENTION.routing_key,
            task_message_build(routing_key=MENTION.routing_key, rows=[(1, invalid_mention)]).message,
        ),
        (MESSAGE_CREATED.routing_key, undecodable),
        (MESSAGE_CREATED.routing_key, unregistered),
    ]


def test_dead_letters_leave_no_payload_in_any_log(broker_url, workers, tmp_path):
    secrets: dict[str, str] = {}

    def secret(where: str) -> str:
        return secrets.setdefault(where, f"secret-{uuid.uuid4().hex}")

    messages = poison_messages(secret)
    with Connection(broker_url) as conn:
        for routing_key, message in messages:
            conn.default_channel.basic_publish_confirm(
                message, exchange=CHAT_EVENTS_EXCHANGE.name, routing_key=routing_key, mandatory=True
            )
    wait_until(
        lambda: DeadLetter.objects.count() == len(messages),
        timeout=60,
        message="the poison messages were not all dead-lettered and archived",
    )
    stored = " ".join(
        (
            base64.b64decode(letter.body).decode(errors="replace")
            if letter.body_encoding == "base64"
            else letter.body
        )
        + json.dumps(letter.headers)
        for letter in DeadLetter.objects.all()
    )
    assert [where for where, value in secrets.items() if value not in stored] == [], "secrets never sent"

    assert leaks(tmp_path, secrets) == []
