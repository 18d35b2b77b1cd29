"""Metrics endpoints of the processes that serve no HTTP themselves (Celery workers, the relay)."""

from __future__ import annotations

import logging

from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


def metrics_server_start(*, port: int, name: str, registry: CollectorRegistry = REGISTRY) -> bool:
    """Serve `registry` on METRICS_BIND_ADDRESS:`port` from a daemon thread; port 0 means disabled.

    The endpoint has no authentication (prometheus_client's server has none), so it listens on
    loopback unless METRICS_BIND_ADDRESS says otherwise: an address only the monitoring network reaches.
    A port already taken (a second worker on the same host with the same setting) is logged and
    the process goes on without an endpoint: metrics must never stop the work itself.
    """
    if not port:
        return False
    address = settings.METRICS_BIND_ADDRESS
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as error:
        logger.error("%s metrics endpoint not started on %s port %d: %s", name, address, port, error)
        return False
    logger.info("%s metrics on http://%s:%d/metrics", name, address, port)
    return True
