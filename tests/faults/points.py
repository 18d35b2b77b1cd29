"""The environment that starts a child process with fault points set (infrastructure/faults.py)."""

from __future__ import annotations


def fault_env(points: dict[str, str]) -> dict[str, str]:
    """`fault_env({"relay.after_confirm": "crash"})`: the child's settings module and FAULT_POINTS."""
    return {
        "DJANGO_SETTINGS_MODULE": "tests.faults.settings",
        "FAULT_POINTS": ",".join(f"{name}={action}" for name, action in points.items()),
    }
