"""The client's network address for throttling: login lockouts (django-axes) and the sign-up limit.

Without a proxy it is the direct peer, REMOTE_ADDR (daphne sets it from the TCP connection; the
Procfile does not pass daphne's --proxy-headers, which would trust the leftmost, client-written
X-Forwarded-For entry). Behind reverse proxies, TRUSTED_PROXY_CLIENT_IP_HEADER names the header
they set and TRUSTED_PROXY_COUNT how many of them append to it: the address is the entry the
outermost proxy wrote, counted from the right, since everything left of it came from the client.
Any other forwarding header is ignored, so a client cannot choose its own address.
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def client_address(request: HttpRequest) -> str | None:
    """The client's IP address as the configured proxies report it, else the direct peer's."""
    peer = request.META.get("REMOTE_ADDR") or None
    header = settings.TRUSTED_PROXY_CLIENT_IP_HEADER
    if not header:
        return peer
    value = request.META.get("HTTP_" + header.upper().replace("-", "_"), "")
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if len(entries) < settings.TRUSTED_PROXY_COUNT:
        # The request did not come through every proxy (or one dropped the header): only the
        # peer is known for sure.
        return peer
    try:
        return str(ipaddress.ip_address(entries[-settings.TRUSTED_PROXY_COUNT]))
    except ValueError:
        return peer
