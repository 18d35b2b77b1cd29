"""The Content-Security-Policy header, and templates that need nothing it forbids."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from tests.conftest import ROOT

TEMPLATE_FOLDERS = (
    "templates",
    "chat/templates",
    "analytics/templates",
    "monitoring/templates",
    "deadletters/templates",
)


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/accounts/login/", "/admin/login/", "/healthz"])
def test_every_response_carries_the_policy(url):
    policy = Client().get(url)["Content-Security-Policy"]

    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy


def test_no_template_has_inline_script_event_handler_or_style_attribute():
    templates = [path for folder in TEMPLATE_FOLDERS for path in (ROOT / folder).rglob("*.html")]
    assert len(templates) > 10
    offending = {}
    for template in templates:
        html = template.read_text()
        found = [
            *re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html),
            *re.findall(r"<[^>]*\s(on[a-z]+|style)\s*=", html),
            *re.findall(r"<style\b", html),
        ]
        if found:
            offending[str(template.relative_to(ROOT))] = found
    assert offending == {}
