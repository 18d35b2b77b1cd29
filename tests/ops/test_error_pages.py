"""templates/500.html: what a page that fails shows with DEBUG off, whatever broke."""

from __future__ import annotations

import pytest
from django.http import HttpRequest, HttpResponse
from django.templatetags.static import static
from django.test import Client
from django.urls import include, path


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
