from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from infrastructure import health, shutdown
from monitoring.collectors import web_metrics_text


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus scrape endpoint of the web process (see collectors.py for what it contains).

    Queue names and backlogs are not for the public. With METRICS_BEARER_TOKEN set, only a request
    carrying that token is answered, from any address: behind a reverse proxy on the same host every
    request comes from loopback, so the address proves nothing. Without it, only peers in
    METRICS_ALLOWED_NETWORKS are.
    """
    if not metrics_reader_allowed(
        address=request.META.get("REMOTE_ADDR", ""),
        authorization=request.headers.get("Authorization", ""),
    ):
        return HttpResponseForbidden("metrics are served to the monitoring system only\n")
    return HttpResponse(web_metrics_text(), content_type=CONTENT_TYPE_LATEST)


def metrics_reader_allowed(*, address: str, authorization: str) -> bool:
    if settings.METRICS_BEARER_TOKEN:
        return metrics_token_presented(authorization=authorization)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(network) for network in settings.METRICS_ALLOWED_NETWORKS)


def metrics_token_presented(*, authorization: str) -> bool:
    """Whether an Authorization header carries METRICS_BEARER_TOKEN (never, with no token set)."""
    token = settings.METRICS_BEARER_TOKEN
    if not token:
        return False
    scheme, _, credentials = authorization.partition(" ")
    # Constant time: how much of a guess matched must not show in the response time.
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


# What the load balancer asks each web process (ops/haproxy/haproxy.cfg.template): whether this
# process serves, without asking PostgreSQL, Redis or RabbitMQ. Their outage is every process's at
# once; taking them all out of rotation would turn it into an outage of everything, /healthz's own
# answer saying what is down included. Checked every second, so it must also cost nothing.
LOAD_BALANCER_CHECK_URI = "/healthz?only=web"
# /healthz's "web" entry while this process shuts down (infrastructure/shutdown.py).
WEB_SHUTTING_DOWN = "this web process is shutting down; new connections go to the others"


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Each service "ok", "degraded: ..." or "down: <what stops>", and "web": whether the answering
    process is shutting down; the error, host and port only for staff and the monitoring.
    `?only=web`: that entry alone.

    Not for the allowed metrics networks: behind a reverse proxy every request comes from one of those.
    A broker that is a cluster (CELERY_BROKER_URL lists several nodes) adds `broker_nodes`, one entry
    per node in the URL's order: "ok" or "down", and whether this process uses it; staff and the
    monitoring also get its URL and why it is down. A cluster missing a minority of its nodes still
    works: "degraded", answered with 200, since taking web processes out of a load balancer would
    not help; 503 means something is down.
    """
    web = "ok" if not shutdown.shutdown_began() else f"down: {WEB_SHUTTING_DOWN}"
    body: dict[str, object] = {"web": web}
    down = [] if web == "ok" else ["web"]
    degraded: list[str] = []
    if request.GET.get("only") != "web":
        with_details = request.user.is_staff or metrics_token_presented(
            authorization=request.headers.get("Authorization", "")
        )
        states = health.check_all()
        body.update({s.name: _service_health(s, with_details=with_details) for s in states})
        for state in states:
            if state.nodes:
                body[f"{state.name}_nodes"] = [
                    _node_health(position, node, with_details=with_details)
                    for position, node in enumerate(state.nodes, start=1)
                ]
        down += [s.name for s in states if not s.ok]
        degraded = [s.name for s in states if s.degraded]
    if down:
        body["status"] = "down: " + ", ".join(down)
    elif degraded:
        body["status"] = "degraded: " + ", ".join(degraded)
    else:
        body["status"] = "ok"
    return JsonResponse(body, status=200 if not down else 503)


def _service_health(state: health.ServiceState, *, with_details: bool) -> str:
    if not state.ok:
        return f"down: {state.consequence(with_details=with_details)}"
    if state.degraded:
        return f"degraded: {state.consequence(with_details=with_details)}"
    return "ok"


def _node_health(position: int, node: health.BrokerNodeState, *, with_details: bool) -> dict[str, object]:
    entry: dict[str, object] = {"node": position, "state": "ok" if node.ok else "down", "in_use": node.in_use}
    if with_details:
        entry["url"] = node.url
        if not node.ok:
            entry["state"] = f"down: {node.error}"
    return entry
