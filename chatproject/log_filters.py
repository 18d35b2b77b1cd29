"""Logging filters named in settings.LOGGING."""

from __future__ import annotations

import logging


class RefusalWithoutTraceback(logging.Filter):
    """Drop the traceback from django.request's line for a 403.

    Django logs a PermissionDenied with its exception attached, so every refused page (a user
    without a permission, an expired CSRF token) wrote some twenty lines of a traceback that shows
    only Django raising what the view meant to raise. One line says it all: status, reason, path.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "status_code", None) == 403:
            record.exc_info = None
            record.exc_text = None
        return True


class LoadBalancerCheckWhileShuttingDown(logging.Filter):
    """Drop django.request's line for the load balancer's health check answered 503.

    A web process shutting down answers it so on purpose, for a few seconds, twice or more from
    each balancer (chatproject/serve.py): an ERROR line each would report a restart as a fault.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from monitoring.views import LOAD_BALANCER_CHECK_URI

        request = getattr(record, "request", None)
        return not (
            getattr(record, "status_code", None) == 503
            and request is not None
            and request.get_full_path() == LOAD_BALANCER_CHECK_URI
        )
