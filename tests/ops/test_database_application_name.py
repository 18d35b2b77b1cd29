"""Every process names its PostgreSQL sessions, so pg_stat_activity tells whose connections are whose."""

from urllib.request import urlopen

from django.conf import settings
from django.db import connection

from infrastructure.postgres import database_connect_autocommit


def session_names() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")
        return [name for (name,) in cursor.fetchall()]


def test_a_process_without_a_name_is_named_after_its_command(db):
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        (name,) = cursor.fetchone()

    assert name == settings.DATABASES["default"]["OPTIONS"]["application_name"]
    assert name.startswith("chat-") and name != "chat-"


def test_the_procfile_web_process_names_its_sessions_chat_web(live_daphne):
    assert "chat-web" not in session_names()

    with urlopen(f"{live_daphne.http_url}/healthz", timeout=10) as response:
        assert response.status == 200

    assert "chat-web" in session_names()


def test_a_raw_connection_is_named_like_the_process(db):
    conn = database_connect_autocommit()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            (name,) = cursor.fetchone()
    finally:
        conn.close()

    assert name == settings.DATABASES["default"]["OPTIONS"]["application_name"]
