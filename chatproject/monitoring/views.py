from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from prometheus_client import CONTENT_TYPE_LATEST

from chatproject.monitoring.collectors import web_metrics_text


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus scrape endpoint of the web process (see collectors.py for what it contains).

    Only for addresses in METRICS_ALLOWED_NETWORKS: queue names and backlogs are not for the public.
    """
    if not _allowed(request.META.get("REMOTE_ADDR", "")):
        return HttpResponseForbidden("metrics are served to the monitoring network only\n")
    return HttpResponse(web_metrics_text(), content_type=CONTENT_TYPE_LATEST)


def _allowed(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(network) for network in settings.METRICS_ALLOWED_NETWORKS)
