"""Creating the configured PostgreSQL database when the server has none of that name."""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions
from django.conf import settings
from psycopg2 import sql


def database_url(db: dict[str, Any]) -> str:
    """A password-free postgres:// URL for a Django DATABASES entry, for messages and child processes."""
    host = db.get("HOST") or "localhost"
    return f"postgres://{db.get('USER') or ''}@{host}:{db.get('PORT') or 5432}/{db['NAME']}"


def database_create_if_missing() -> bool:
    """Create the database named in DATABASE_URL; True when it had to be created.

    Connects to the server's `postgres` maintenance database, since the target may not exist.
    Raises psycopg2.OperationalError when the server cannot be reached.
    """
    db = settings.DATABASES["default"]
    # CREATE DATABASE cannot run inside a transaction.
    conn = database_connect_autocommit(dbname="postgres")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
            if cursor.fetchone():
                return False
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            return True
    finally:
        conn.close()


def database_connect_autocommit(*, dbname: str | None = None) -> psycopg2.extensions.connection:
    """A raw autocommit psycopg2 connection to the configured server, outside Django's pool.

    For what Django's connections cannot do: LISTEN (the relay), CREATE DATABASE (preflight).
    `dbname` defaults to the configured database.
    """
    db = settings.DATABASES["default"]
    conn = psycopg2.connect(
        dbname=dbname or db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        connect_timeout=3,
    )
    conn.autocommit = True
    return conn
