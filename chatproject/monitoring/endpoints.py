"""Metrics endpoints of the processes that serve no HTTP themselves (Celery workers, the relay)."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


def metrics_server_start(*, port: int, name: str, registry: CollectorRegistry = REGISTRY) -> bool:
    """Serve `registry` on 0.0.0.0:`port` from a daemon thread; port 0 means disabled.

    A port already taken (a second worker on the same host with the same setting) is logged and
    the process goes on without an endpoint: metrics must never stop the work itself.
    """
    if not port:
        return False
    try:
        start_http_server(port, registry=registry)
    except OSError as error:
        logger.error("%s metrics endpoint not started on port %d: %s", name, port, error)
        return False
    logger.info("%s metrics on http://0.0.0.0:%d/metrics", name, port)
    return True
