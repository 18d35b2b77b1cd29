"""PostgreSQL work Django's ORM does not do for us: creating the configured database, raw
autocommit connections, and deleting a growing table's old rows in chunks (every prune)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from django.conf import settings
from django.db.models import QuerySet
from psycopg2 import sql

# Rows per DELETE of delete_in_chunks: small enough for a short transaction, large enough that
# a day of a busy chat takes a few hundred statements, not millions.
DELETE_CHUNK = 10_000


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
        # Named like the process's Django connections (DB_APPLICATION_NAME), e.g. the relay's LISTEN.
        application_name=db.get("OPTIONS", {}).get("application_name"),
    )
    conn.autocommit = True
    return conn


def delete_in_chunks(
    queryset: QuerySet, *, chunk_size: int | None = None, between_chunks: Callable[[], None] | None = None
) -> int:
    """Delete every row of `queryset`, a chunk at a time, in its order; returns how many rows of its model.

    `between_chunks` runs after each full chunk: a process that keeps AMQP heartbeats (the relay,
    the dead-letter archiver) passes its keep-alive, since a long prune would otherwise go silent
    for longer than the broker waits.

    Called by the periodic prunes. Each chunk is its own short transaction (unless the caller holds
    one): a day of a busy chat is millions of rows, and one huge DELETE would hold its locks and
    WAL burst for the whole of it. Rows that cascade from them go with their chunk; only the
    chunk's primary keys are loaded, never the rows themselves.
    """
    model = queryset.model
    chunk_size = chunk_size or DELETE_CHUNK
    total = 0
    while True:
        chunk = queryset.values("pk")[:chunk_size]
        _, per_model = model._default_manager.filter(pk__in=chunk).only("pk").delete()
        deleted = per_model.get(model._meta.label, 0)
        total += deleted
        # Fewer than a full chunk: nothing left (or a concurrent prune is deleting the rest).
        if deleted < chunk_size:
            return total
        if between_chunks is not None:
            between_chunks()
