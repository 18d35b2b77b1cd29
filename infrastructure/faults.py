"""Fault points: places where a test can make a process crash or pause, and nothing else can.

A process under test runs with DJANGO_SETTINGS_MODULE=tests.faults.settings, whose FAULT_POINTS
({point name: "crash" or seconds}) comes from the FAULT_POINTS environment variable, e.g.
`FAULT_POINTS="relay.after_confirm=crash,archiver.after_commit=5"`. Production settings do not
define FAULT_POINTS, so every point is a no-op there and no production command offers a fault flag.
"""

from __future__ import annotations

import logging
import os
import time

from django.conf import settings

logger = logging.getLogger(__name__)

# Exit status of a process a fault point crashed, distinct from any real failure.
FAULT_CRASH_EXIT_CODE = 75
CRASH = "crash"


def fault_point(name: str) -> None:
    """Called where a crash or a pause would hurt most; does what FAULT_POINTS says for `name`.

    "crash" dies like a SIGKILL (no cleanup, no finally blocks); seconds pause there, logged first
    so a test can SIGKILL the process in that state. Nothing when the point is not configured.
    """
    action = getattr(settings, "FAULT_POINTS", {}).get(name)
    if action is None:
        return
    if action == CRASH:
        logger.warning("fault injection: %s, crashing", name)
        logging.shutdown()
        os._exit(FAULT_CRASH_EXIT_CODE)
    logger.warning("fault injection: %s, pausing %ss", name, action)
    time.sleep(float(action))
