"""docs/deployment.md's production environment: `manage.py check --deploy` reports nothing with it."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys

from tests.conftest import ROOT


def documented_production_environment() -> dict[str, str]:
    """The `env` block of docs/deployment.md, with a fresh key where it names how to make one."""
    block = re.search(r"```env\n(.*?)```", (ROOT / "docs/deployment.md").read_text(), flags=re.S).group(1)
    environment = dict(line.split("=", 1) for line in block.splitlines())
    assert environment["SECRET_KEY"].startswith("<")
    environment["SECRET_KEY"] = secrets.token_urlsafe(50)
    return environment


def production_base_environment() -> dict[str, str]:
    """This suite's environment without the documented variables (or the web port), so none leak in."""
    excluded = {*documented_production_environment(), "PORT", "SITE_URL", "CHAT_ALLOWED_ORIGINS"}
    base = {k: v for k, v in os.environ.items() if k not in excluded}
    return {**base, "DJANGO_SETTINGS_MODULE": "chatproject.settings"}


def check_deploy(environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**production_base_environment(), **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_reports_nothing_with_the_documented_production_environment():
    result = check_deploy(documented_production_environment())

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_documented_production_environment_accepts_sockets_and_links_over_https_only():
    script = "import django, json; django.setup(); from django.conf import settings as s; "
    script += "print(json.dumps([s.CHAT_ALLOWED_ORIGINS, s.SITE_URL]))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**production_base_environment(), **documented_production_environment()},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    origins, site_url = json.loads(result.stdout)
    assert origins and all(origin.startswith("https://") for origin in origins), origins
    assert "https://chat.example.com" in origins
    assert site_url == "https://chat.example.com"


def test_check_deploy_warns_with_the_defaults():
    result = check_deploy({"SECRET_KEY": secrets.token_urlsafe(50)})

    assert result.returncode != 0
    for warning in ("W004", "W008", "W012", "W016"):  # HSTS, SSL redirect, session and CSRF cookies
        assert f"security.{warning}" in result.stderr


READ_HTTPS_SETTINGS = """
import django, json
django.setup()
from django.conf import settings as s
print(json.dumps([s.SECURE_PROXY_SSL_HEADER, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS]))
"""


def read_https_settings(**environment: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in documented_production_environment()}
    return subprocess.run(
        [sys.executable, "-c", READ_HTTPS_SETTINGS],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "chatproject.settings", "SECRET_KEY": "k", **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_proxy_https_header_comes_from_the_environment():
    with_proxy = read_https_settings(
        SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
        SECURE_SSL_REDIRECT="1",
        SECURE_HSTS_SECONDS="60",
    )
    without = read_https_settings()

    assert json.loads(with_proxy.stdout) == [["HTTP_X_FORWARDED_PROTO", "https"], True, 60]
    assert json.loads(without.stdout) == [None, False, 0]


def test_a_malformed_proxy_https_header_is_refused_with_the_expected_form():
    result = read_https_settings(SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https")

    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "SECURE_PROXY_SSL_HEADER must be 'HTTP_<HEADER>,<value>', e.g. 'HTTP_X_FORWARDED_PROTO,https', "
            "not 'X-Forwarded-Proto: https'"
        )
    )
