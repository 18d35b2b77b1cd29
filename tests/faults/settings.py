"""Settings for child processes under fault injection: the project's, plus FAULT_POINTS.

`FAULT_POINTS="relay.after_confirm=crash,analytics.in_transaction=120"` makes
infrastructure.faults.fault_point crash, or pause that many seconds, at those names. The harness
(tests/harness.py) starts a child with these settings when its environment holds FAULT_POINTS.
"""

import os

from chatproject.settings import *  # noqa: F403

FAULT_POINTS: dict[str, str] = dict(
    point.split("=", 1) for point in os.environ.get("FAULT_POINTS", "").split(",") if point
)
