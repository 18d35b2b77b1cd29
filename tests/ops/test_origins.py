"""chatproject/origins.py: a socket handshake is accepted only from a configured origin.

Scheme, host and port must all match an entry of CHAT_ALLOWED_ORIGINS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chatproject.asgi import application
from tests.conftest import ROOT, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

SITE = "http://localhost:8000"


async def handshake(user, origin: str | None) -> bool:
    """Whether the room socket's handshake with this Origin header (None: none) is accepted."""
    cookie = await sync_to_async(session_cookie)(user)
    headers = [(b"cookie", f"sessionid={cookie}".encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    communicator = WebsocketCommunicator(application, "/ws/rooms/general/", headers=headers)
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    return connected


@pytest.fixture
async def alice(make_user, make_room, settings):
    settings.CHAT_ALLOWED_ORIGINS = [SITE, "https://*.example.com"]
    await sync_to_async(make_room)("general")
    return await sync_to_async(make_user)("alice")


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:1234",  # another port of an allowed host
        "https://127.0.0.1",  # another scheme (and port)
        "https://localhost:8000",  # another scheme, same port
        "http://localhost",  # the scheme's default port is not 8000
        "http://evil.example:8000",
        "http://example.com.evil:8000",
        "http://sub.example.com",  # the wildcard entry is https only
        "null",
        "not an origin",
    ],
)
async def test_foreign_origin_is_refused_at_handshake(alice, origin):
    assert not await handshake(alice, origin)


@pytest.mark.parametrize(
    "origin", [SITE, "HTTP://LOCALHOST:8000", "https://example.com", "https://a.example.com"]
)
async def test_configured_origin_is_accepted(alice, origin):
    assert await handshake(alice, origin)


async def test_missing_origin_is_refused_as_before(alice):
    assert not await handshake(alice, None)


ORIGIN_VARIABLES = (
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "SITE_SCHEME",
    "SITE_PORT",
    "PORT",
    "CHAT_ALLOWED_ORIGINS",
)


def settings_origins(**env: str) -> list[str]:
    """CHAT_ALLOWED_ORIGINS as a fresh process computes it from this environment."""
    base = {k: v for k, v in os.environ.items() if k not in ORIGIN_VARIABLES}
    script = "import django, json; django.setup(); from django.conf import settings as s; "
    script += "print(json.dumps(s.CHAT_ALLOWED_ORIGINS))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "chatproject.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_default_origins_are_the_allowed_hosts_at_the_web_process_port():
    assert settings_origins() == ["http://localhost:8000", "http://127.0.0.1:8000"]
    assert settings_origins(PORT="9000") == ["http://localhost:9000", "http://127.0.0.1:9000"]


def test_default_origins_follow_the_site_scheme_and_port_behind_a_proxy():
    origins = settings_origins(
        ALLOWED_HOSTS="chat.example.com",
        SITE_SCHEME="https",
        SITE_PORT="443",
        PORT="8000",
        CSRF_TRUSTED_ORIGINS="https://admin.example.com",
    )
    assert origins == ["https://chat.example.com", "https://admin.example.com"]


def test_a_malformed_origin_setting_stops_the_web_process_with_its_name(settings):
    from django.core.exceptions import ImproperlyConfigured

    from chatproject.origins import SiteOriginValidator

    settings.CHAT_ALLOWED_ORIGINS = ["chat.example.com"]
    with pytest.raises(ImproperlyConfigured) as refused:
        SiteOriginValidator(application)
    assert str(refused.value).startswith("CHAT_ALLOWED_ORIGINS: 'chat.example.com' is not an origin")


async def test_live_server_accepts_its_own_origin_and_refuses_another_port(live_daphne, make_user, make_room):
    """The Procfile's web process on a free port: PORT gives the default origins their port."""
    await sync_to_async(make_room)("general")
    cookie = await sync_to_async(session_cookie)(await sync_to_async(make_user)("alice"))
    url = f"{live_daphne.ws_url}/ws/rooms/general/"
    headers = {"Cookie": f"sessionid={cookie}"}

    async with connect(url, origin=f"http://127.0.0.1:{live_daphne.port}", additional_headers=headers):
        pass
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin="http://127.0.0.1:8000", additional_headers=headers)
    assert refused.value.response.status_code == 403
