"""The relay's instrument: how long a round of publishing takes until the broker confirmed it.

Counted in the process where it happens; /metrics serves them (monitoring/ lists every name).
"""

from __future__ import annotations

from prometheus_client import Histogram

# Publishing a round is a few ms when healthy; seconds mean the broker is slow to confirm.
RELAY_PUBLISH_SECONDS = Histogram(
    "chat_relay_publish_seconds",
    "Time for one relay round: publishing its task messages until the broker confirmed all of them.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
