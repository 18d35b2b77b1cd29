"""Fault points (infrastructure/faults.py): inert in production, set per child process by tests."""

from __future__ import annotations

import importlib
import logging

from chatproject import settings as production_settings
from infrastructure.faults import fault_point


def test_production_settings_define_no_fault_points():
    assert not hasattr(production_settings, "FAULT_POINTS")


def test_fault_settings_read_the_points_from_the_environment(monkeypatch):
    monkeypatch.setenv("FAULT_POINTS", "relay.after_confirm=crash, archiver.after_commit=5")
    from tests.faults import settings as fault_settings

    fault_settings = importlib.reload(fault_settings)

    assert fault_settings.FAULT_POINTS == {"relay.after_confirm": "crash", "archiver.after_commit": "5"}
    assert fault_settings.INSTALLED_APPS == production_settings.INSTALLED_APPS


def test_a_point_not_configured_does_nothing(settings, caplog):
    settings.FAULT_POINTS = {"archiver.after_commit": "0"}

    with caplog.at_level(logging.WARNING, logger="infrastructure.faults"):
        fault_point("relay.after_confirm")

    assert caplog.records == []


def test_a_paused_point_says_so_before_it_pauses(settings, caplog):
    settings.FAULT_POINTS = {"archiver.after_commit": "0"}

    with caplog.at_level(logging.WARNING, logger="infrastructure.faults"):
        fault_point("archiver.after_commit")

    assert [r.getMessage() for r in caplog.records] == ["fault injection: archiver.after_commit, pausing 0s"]
