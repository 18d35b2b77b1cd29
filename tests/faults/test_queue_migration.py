"""`migrate_queues` crashed at its steps (a fault point dying like SIGKILL) and run again: every
message is there, once, with its properties; `setup_broker --check` names the unfinished
migration in between and is clean after."""

from __future__ import annotations

from collections import Counter

import pytest
from django.core.management import call_command
from kombu import Connection

from infrastructure.faults import FAULT_CRASH_EXIT_CODE
from messaging.topology import ANALYTICS_QUEUE_NAME, topology_differences
from tests.broker.classic_installation import (
    assert_every_message_once,
    assert_kept,
    classic_installation_declare,
    classic_installation_fill,
    messages_by_id,
    migrate_queues_process,
    quorum_settings,
)

BATCH_SIZE = "100"  # the analytics queue's 250 messages take three batches


def migrate_queues_crashing_at(broker_url: str, point: str) -> None:
    crashed = migrate_queues_process(broker_url, "--batch-size", BATCH_SIZE, faults={point: "crash"})
    output = crashed.communicate(timeout=300)[0]
    assert crashed.returncode == FAULT_CRASH_EXIT_CODE, output


@pytest.mark.parametrize(
    "point",
    [
        "queue_migration.out.after_destination_bound",  # the queue and its holding queue both bound
        "queue_migration.out.after_batch",  # a batch moved to the holding queue, the rest not
        "queue_migration.out.after_source_deleted",  # the queue gone, its messages all held
        "queue_migration.back.after_source_unbound",  # the new queue bound, nothing moved back yet
        "queue_migration.back.after_batch",  # part moved back
    ],
)
def test_running_again_after_a_crash_finishes_with_every_message_once(point, scratch_broker_url, settings):
    classic_installation_declare(scratch_broker_url)
    sent = classic_installation_fill(scratch_broker_url)
    migrate_queues_crashing_at(scratch_broker_url, point)
    quorum_settings(settings, scratch_broker_url)
    with Connection(scratch_broker_url) as connection:
        unfinished = [d.name for d in topology_differences(connection) if "unfinished" in d.problem]
    assert unfinished == [f"{ANALYTICS_QUEUE_NAME}.migrating"]

    call_command("migrate_queues", "--batch-size", BATCH_SIZE)

    call_command("setup_broker", "--check")  # raises CommandError on any difference
    assert_every_message_once(scratch_broker_url, sent)


def test_crash_between_a_batchs_confirms_and_its_ack_moves_that_batch_again_and_loses_nothing(
    scratch_broker_url, settings
):
    classic_installation_declare(scratch_broker_url)
    sent = classic_installation_fill(scratch_broker_url)
    migrate_queues_crashing_at(scratch_broker_url, "queue_migration.out.after_confirm")
    quorum_settings(settings, scratch_broker_url)

    call_command("migrate_queues", "--batch-size", BATCH_SIZE)

    found = messages_by_id(scratch_broker_url)
    assert set(found) == set(sent)
    # The batch whose copies were confirmed but not yet acked is in the holding queue twice.
    copies = Counter(len(found_copies) for found_copies in found.values())
    assert copies == {1: len(sent) - int(BATCH_SIZE), 2: int(BATCH_SIZE)}
    for test_id, found_copies in found.items():
        for queue, message in found_copies:
            assert_kept(sent[test_id], queue, message)
