import json

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.broker


def test_bench_analytics_lag_counts_every_message_and_reports_percentiles(
    transactional_db, broker_url, capsys
):
    call_command(
        "bench_analytics_lag", rate=40, seconds=1, processes=1, threads=2, rooms=2, users=3, json=True
    )

    report = json.loads(capsys.readouterr().out)
    assert report["messages"] == 40
    assert 0 <= report["p50_seconds"] <= report["p99_seconds"] <= report["max_seconds"]
    assert isinstance(report["meets_target"], bool)


def test_bench_analytics_lag_events_only_paces_synthetic_events_through_the_pipeline(
    transactional_db, broker_url, capsys
):
    call_command("bench_analytics_lag", rate=100, seconds=0.5, events_only=True, rooms=2, users=3, json=True)

    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "events"
    assert report["messages"] == 50
    assert 0 <= report["p50_seconds"] <= report["p99_seconds"] <= report["max_seconds"]
