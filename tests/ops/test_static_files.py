"""Static files as the web process serves them: hashed names, cached for a year, compressed."""

from __future__ import annotations

import gzip
import re
import urllib.request

from tests.conftest import ROOT


def fetch(url: str, **headers: str):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)


def test_pages_name_hashed_static_files_served_compressed_with_a_long_lifetime(live_daphne):
    page = fetch(f"{live_daphne.http_url}/accounts/login/").read().decode()
    [stylesheet] = re.findall(r'href="(/static/chat/chat\.[0-9a-f]{12}\.css)"', page)

    response = fetch(f"{live_daphne.http_url}{stylesheet}", **{"Accept-Encoding": "gzip"})

    assert response.headers["Content-Encoding"] == "gzip"
    max_age = int(re.search(r"max-age=(\d+)", response.headers["Cache-Control"]).group(1))
    assert max_age >= 365 * 24 * 3600
    assert gzip.decompress(response.read()) == (ROOT / "chat/static/chat/chat.css").read_bytes()
