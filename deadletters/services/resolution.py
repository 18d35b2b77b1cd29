"""How a person resolves a dead letter: replays it to its original exchange, or discards it.

Both are audited (a DeadLetterAction row, and Django's admin log when a user acted).
"""

from __future__ import annotations

import base64
import getpass
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import amqp
from django.conf import settings
from django.contrib.admin.models import CHANGE, LogEntry
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from deadletters.models import DeadLetter, DeadLetterAction
from messaging.confirms import ConfirmingPublisher, Outgoing
from messaging.connection import BrokerUnavailable

logger = logging.getLogger(__name__)

# Headers RabbitMQ writes when it dead-letters; a replay drops them so the next death is described
# afresh instead of being folded into the old history.
DEATH_HEADERS = ("x-death", "x-first-death-queue", "x-first-death-reason", "x-first-death-exchange")
DEATH_HEADER_PREFIXES = ("x-last-death-",)
# Properties a replay must not copy: RabbitMQ checks user_id against the publishing user, and an
# expiration would let the replay expire again (RabbitMQ already strips it when dead-lettering).
REPLAY_DROPPED_PROPERTIES = ("user_id", "expiration", "timestamp", "application_headers")
REPLAY_HEADER = "x-replay-of"
# Letters per publish-and-confirm round and per marking transaction.
REPLAY_CHUNK = 200


def replay_publisher(broker_url: str | None = None) -> ConfirmingPublisher:
    """The confirming publisher replays go through; a returned message is found by REPLAY_HEADER."""
    return ConfirmingPublisher(
        broker_url or settings.CELERY_BROKER_URL,
        return_key=lambda message: (message.properties.get("application_headers") or {}).get(REPLAY_HEADER),
    )


def replay_message(dead_letter: DeadLetter) -> tuple[bytes, dict[str, Any]]:
    """The body and properties a replay publishes: the original minus the death history."""
    body = (
        base64.b64decode(dead_letter.body)
        if dead_letter.body_encoding == DeadLetter.BodyEncoding.BASE64
        else dead_letter.body.encode("utf-8")
    )
    headers = {
        key: value
        for key, value in (dead_letter.headers or {}).items()
        if key not in DEATH_HEADERS and not key.startswith(DEATH_HEADER_PREFIXES)
    }
    if "retries" in headers:
        # A replay is a fresh start: with the old count the first transient error would exhaust
        # the task's retries at once.
        headers["retries"] = 0
    headers[REPLAY_HEADER] = dead_letter.pk
    properties = {
        key: value
        for key, value in (dead_letter.properties or {}).items()
        if key not in REPLAY_DROPPED_PROPERTIES and value is not None
    }
    properties.setdefault("delivery_mode", 2)
    properties["application_headers"] = headers
    return body, properties


@dataclass
class BulkResult:
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    # The broker node a replay published through (one of a cluster's, no password); empty when none.
    node: str = ""


def _actor_label(actor: Any, actor_label: str | None) -> str:
    if actor_label:
        return actor_label
    if actor is not None and getattr(actor, "is_authenticated", False):
        return actor.get_username()
    return f"cli:{getpass.getuser()}"


def _audit(*, dead_letters: list[DeadLetter], kind: str, actor: Any, label: str) -> None:
    user = actor if actor is not None and getattr(actor, "pk", None) else None
    DeadLetterAction.objects.bulk_create(
        DeadLetterAction(dead_letter=dead_letter, kind=kind, actor=user, actor_label=label)
        for dead_letter in dead_letters
    )
    if user is not None:
        LogEntry.objects.log_actions(
            user_id=user.pk,
            queryset=dead_letters,
            action_flag=CHANGE,
            change_message="Replayed to its original exchange" if kind == "replayed" else "Discarded",
        )


def dead_letter_replay(
    *,
    dead_letters: Iterable[DeadLetter],
    actor: Any = None,
    actor_label: str | None = None,
    publisher: ConfirmingPublisher | None = None,
) -> BulkResult:
    """Republish each dead letter to its original exchange and routing key, confirmed, and mark it.

    Works in chunks: publish a chunk, wait for its confirms, then mark the confirmed rows (status
    replayed, replay_count + 1, audit row and admin LogEntry) in one transaction. A crash between
    the confirms and the commit leaves those rows as they were, and replaying them again is
    harmless: the tasks are idempotent, which is also what makes replaying a letter whose
    effect already happened change nothing.
    """
    label = _actor_label(actor, actor_label)
    result = BulkResult()
    own_publisher = publisher is None
    publisher = publisher or replay_publisher()
    chunk: list[DeadLetter] = []
    try:
        for dead_letter in dead_letters:
            chunk.append(dead_letter)
            if len(chunk) == REPLAY_CHUNK:
                _replay_chunk(chunk, publisher=publisher, actor=actor, label=label, result=result)
                chunk = []
        if chunk:
            _replay_chunk(chunk, publisher=publisher, actor=actor, label=label, result=result)
    finally:
        if own_publisher:
            publisher.close()
    if result.done or result.failed:
        logger.info(
            "%s replayed %d dead letters (%d failed) through %s",
            label,
            len(result.done),
            len(result.failed),
            result.node or "no broker node",
        )
    return result


def _replay_chunk(
    chunk: list[DeadLetter], *, publisher: ConfirmingPublisher, actor: Any, label: str, result: BulkResult
) -> None:
    batch = []
    for dead_letter in chunk:
        body, properties = replay_message(dead_letter)
        batch.append(
            Outgoing(
                dead_letter.pk,
                amqp.Message(body, **properties),
                dead_letter.origin_exchange,
                dead_letter.routing_key,
            )
        )
    try:
        failed = publisher.publish(batch)
    except BrokerUnavailable as error:
        # Nothing of the chunk counts as replayed; replaying it again is harmless.
        result.failed.update({dead_letter.pk: f"broker unreachable: {error}" for dead_letter in chunk})
        return
    result.node = publisher.node
    confirmed = [dead_letter for dead_letter in chunk if dead_letter.pk not in failed]
    if confirmed:
        now = timezone.now()
        with transaction.atomic():
            DeadLetter.objects.filter(pk__in=[dl.pk for dl in confirmed]).update(
                status=DeadLetter.Status.REPLAYED,
                replay_count=F("replay_count") + 1,
                last_replayed_at=now,
                updated_at=now,
            )
            _audit(dead_letters=confirmed, kind=DeadLetterAction.Kind.REPLAYED, actor=actor, label=label)
    # Side effects, in order: the chunk's publishes confirmed by RabbitMQ, then its rows marked.
    result.done.extend(dead_letter.pk for dead_letter in confirmed)
    result.failed.update(failed)


def dead_letter_discard(
    *, dead_letters: Iterable[DeadLetter], actor: Any = None, actor_label: str | None = None
) -> BulkResult:
    """Mark dead letters discarded: kept for the record and still replayable, but no longer `new`."""
    label = _actor_label(actor, actor_label)
    letters = list(dead_letters)
    with transaction.atomic():
        DeadLetter.objects.filter(pk__in=[dl.pk for dl in letters]).update(
            status=DeadLetter.Status.DISCARDED, updated_at=timezone.now()
        )
        _audit(dead_letters=letters, kind=DeadLetterAction.Kind.DISCARDED, actor=actor, label=label)
    if letters:
        logger.info("%s discarded %d dead letters", label, len(letters))
    return BulkResult(done=[dl.pk for dl in letters])
