"""The sockets' Origin check: only the site's own pages may open a socket with the user's cookies.

Browsers send cookies with a cross-site WebSocket handshake, so without this check any page could
open a socket as the logged-in user (cross-site WebSocket hijacking); it is what CSRF protection is
for forms. An Origin is allowed when its scheme, host and port all match one of
`CHAT_ALLOWED_ORIGINS`: `http://localhost:1234` is not `http://localhost:8000`, and
`https://127.0.0.1` is not `http://127.0.0.1:8000`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http.request import is_same_domain

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class AllowedOrigin:
    """One allowed origin; `host` may be `.example.com` (it and its subdomains) or `*` (any host)."""

    scheme: str
    host: str
    port: int

    def matches(self, *, scheme: str, host: str, port: int) -> bool:
        if (scheme, port) != (self.scheme, self.port):
            return False
        return self.host == "*" or is_same_domain(host, self.host)


def allowed_origin_parse(text: str) -> AllowedOrigin:
    """`scheme://host[:port]` from the settings; ValueError saying what is wrong with it.

    Accepts CSRF_TRUSTED_ORIGINS' `https://*.example.com` for a domain and its subdomains.
    """
    parts = urlsplit(text.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{text!r} is not an origin like https://chat.example.com[:port]")
    host = parts.hostname
    if host.startswith("*."):
        host = host[1:]
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    return AllowedOrigin(scheme=parts.scheme, host=host, port=port)


def allowed_origins() -> list[AllowedOrigin]:
    """`CHAT_ALLOWED_ORIGINS`, parsed; ImproperlyConfigured naming the first bad entry."""
    try:
        return [allowed_origin_parse(text) for text in settings.CHAT_ALLOWED_ORIGINS]
    except ValueError as error:
        raise ImproperlyConfigured(f"CHAT_ALLOWED_ORIGINS: {error}") from None


def origin_allowed(origin: str | None, *, allowed: list[AllowedOrigin]) -> bool:
    """True when the handshake's Origin header value matches one of `allowed`.

    A missing, opaque (`null`) or malformed Origin is refused: browsers always send one.
    """
    if not origin:
        return False
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return False
    return any(entry.matches(scheme=parts.scheme, host=parts.hostname, port=port) for entry in allowed)


class SiteOriginValidator:
    """ASGI middleware for the websocket protocol: refuses the handshake (HTTP 403) from other origins.

    The setting is read at each handshake (a few string splits), so tests can change it; a bad
    value stops the web process at start-up instead.
    """

    def __init__(self, application: Any) -> None:
        self.application = application
        allowed_origins()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origin = None
        for name, value in scope.get("headers", []):
            if name == b"origin":
                origin = value.decode("latin1")
        if origin_allowed(origin, allowed=allowed_origins()):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
