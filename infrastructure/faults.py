"""Fault points: named places where a test makes a process pause or die, so that it can kill it there.

Only the test settings (tests/faults/settings.py) define FAULT_POINTS, {name: "crash" or seconds};
production settings do not, so a fault point costs one dictionary lookup and does nothing.
"""

from __future__ import annotations

import logging
import os
import time

from django.conf import settings

# The exit status of a process that crashed at a fault point (EX_TEMPFAIL).
FAULT_CRASH_EXIT_CODE = 75


def fault_point(name: str) -> None:
    """Called where a fault may be injected; returns at once unless FAULT_POINTS names `name`.

    "crash" ends the process on the spot (no cleanup, nothing acked or marked, logs flushed);
    a number of seconds pauses there, for the test to kill the process mid-way.
    """
    action = getattr(settings, "FAULT_POINTS", {}).get(name)
    if action is None:
        return
    if action == "crash":
        logging.shutdown()
        os._exit(FAULT_CRASH_EXIT_CODE)
    time.sleep(float(action))
