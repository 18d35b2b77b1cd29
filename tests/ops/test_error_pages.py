"""templates/500.html: what a page that fails shows with DEBUG off, whatever broke."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from django.http import HttpRequest, HttpResponse
from django.templatetags.static import static
from django.test import Client
from django.urls import include, path

from tests.conftest import session_cookie


def raising_view(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("a bug in a view")


def missing_static_file_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(static("chat/no-such-file.css"))  # not in the manifest: ValueError


urlpatterns = [
    path("raises/", raising_view),
    path("missing-static/", missing_static_file_view),
    path("", include("chatproject.urls")),
]
pytestmark = [pytest.mark.urls(__name__), pytest.mark.django_db]


@pytest.mark.parametrize("url", ["/raises/", "/missing-static/"])
def test_a_failing_view_shows_the_sites_error_page(url, settings):
    settings.DEBUG = False
    client = Client(raise_request_exception=False)

    response = client.get(url)

    assert response.status_code == 500
    page = response.content.decode()
    assert 'data-testid="server-error"' in page and "Something went wrong" in page
    assert '<link rel="stylesheet" href="/static/chat/chat.css">' in page
    assert client.get("/static/chat/chat.css").status_code == 200  # the page keeps the site's look


def test_a_refused_page_shows_the_sites_no_access_page(make_user, settings):
    settings.DEBUG = False
    client = Client()
    client.force_login(make_user("alice", is_staff=True))

    response = client.get("/analytics/")

    assert response.status_code == 403
    page = response.content.decode()
    assert 'data-testid="forbidden"' in page and "No access" in page
    assert 'class="topbar"' in page and 'data-testid="nav-user" title="alice">alice<' in page


@pytest.mark.urls("chatproject.urls")
def test_a_refused_page_is_one_log_line_without_traceback(live_daphne, make_user):
    """The web process as deployed: django.request's WARNING for a 403 carries no traceback."""
    cookie = session_cookie(make_user("alice", is_staff=True))
    request = urllib.request.Request(
        f"{live_daphne.http_url}/analytics/", headers={"Cookie": f"sessionid={cookie}"}
    )

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    live_daphne.stop()  # flushes its log

    assert refused.value.code == 403
    log = live_daphne.log_path.read_text()
    request_lines = [line for line in log.splitlines() if "django.request" in line]
    assert len(request_lines) == 1
    assert request_lines[0].endswith(" WARNING django.request Forbidden (Permission denied): /analytics/")
    assert "Traceback" not in log and "PermissionDenied" not in log
