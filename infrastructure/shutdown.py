"""Whether this process began a graceful shutdown: a web process after SIGTERM.

The web launcher (chatproject/serve.py) begins it; /healthz reports it, so that the load balancer
takes the process out of rotation while it still serves, before it stops listening. Read from any
thread (the health check runs on an HTTP thread, the launcher on the event loop's).
"""

from __future__ import annotations

import threading

_began = threading.Event()


def shutdown_begin() -> None:
    """From now on this process reports itself as shutting down."""
    _began.set()


def shutdown_began() -> bool:
    return _began.is_set()
