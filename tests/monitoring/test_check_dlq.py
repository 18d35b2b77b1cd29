"""`manage.py check_dlq`: Nagios exit codes and one status line."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from deadletters.models import DeadLetter


def run_check_dlq(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        call_command("check_dlq", *args)
    return exit_info.value.code, capsys.readouterr().out


def test_no_dead_letters_is_ok(db, capsys):
    code, out = run_check_dlq(capsys, "--warning", "2", "--critical", "5")

    assert code == 0
    assert out.startswith("DLQ OK - 0 unresolved dead letters")
    assert len(out.strip().splitlines()) == 1


def test_at_the_warning_count_exits_1(make_dead_letters, capsys):
    make_dead_letters(2)

    code, out = run_check_dlq(capsys, "--warning", "2", "--critical", "5")

    assert code == 1
    assert out.startswith("DLQ WARNING - 2 unresolved dead letters")


def test_at_the_critical_count_exits_2(make_dead_letters, capsys):
    make_dead_letters(5)

    code, out = run_check_dlq(capsys, "--warning", "2", "--critical", "5")

    assert code == 2
    assert out.startswith("DLQ CRITICAL - 5 unresolved dead letters")


def test_resolved_dead_letters_do_not_count(make_dead_letters, capsys):
    make_dead_letters(5, status=DeadLetter.Status.REPLAYED)
    make_dead_letters(1, status=DeadLetter.Status.DISCARDED)

    code, _ = run_check_dlq(capsys, "--warning", "2", "--critical", "5")

    assert code == 0


def test_check_dlq_sends_no_notification(make_dead_letters, capsys, mailoutbox, settings):
    settings.ADMINS = [("Ops", "ops@example.com")]
    make_dead_letters(5)

    run_check_dlq(capsys, "--warning", "2", "--critical", "5")

    assert mailoutbox == []
