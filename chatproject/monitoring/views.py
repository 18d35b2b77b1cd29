from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST

from chatproject.monitoring.collectors import web_metrics_text


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus scrape endpoint of the web process (see collectors.py for what it contains)."""
    return HttpResponse(web_metrics_text(), content_type=CONTENT_TYPE_LATEST)
