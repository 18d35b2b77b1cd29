"""Polling with a deadline: how the suite waits for other processes without timing assertions."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(condition: Callable[[], object], *, timeout: float, message: str) -> object:
    """Poll `condition` until it is truthy and return its value; fail with `message` after `timeout`.

    `timeout` is an upper bound for a stuck process, never a performance claim.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{message} (waited {timeout:.0f}s)")
        time.sleep(0.1)
