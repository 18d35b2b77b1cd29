"""`make run`: its steps in order, and a one-sentence refusal when PostgreSQL is down.

`-o .venv/.installed` treats the virtualenv as installed, so no test here installs anything.
"""

import os
import re
import stat
import subprocess

from bench.procfile import free_port
from infrastructure.health import HOW_TO_START
from tests.conftest import ROOT

SKIP_INSTALL = "-o.venv/.installed"


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    # A make running this suite (`make test`) must not pass its flags down to this one.
    parent = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", SKIP_INSTALL, *args],
        cwd=ROOT,
        env={**parent, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_checks_services_then_migrates_then_seeds_then_starts_the_procfile():
    dry_run = make("-n", "run")

    assert dry_run.returncode == 0, dry_run.stderr
    steps = ("manage.py preflight", "manage.py migrate", "manage.py seed_demo", "honcho start --port")
    positions = [dry_run.stdout.find(step) for step in steps]
    assert -1 not in positions, dry_run.stdout
    assert positions == sorted(positions), dry_run.stdout


def test_run_with_postgresql_unreachable_says_so_and_how_to_start_it_without_a_traceback():
    port = free_port()

    result = make("run", DATABASE_URL=f"postgres://postgres@127.0.0.1:{port}/chat")

    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"PostgreSQL is not reachable at postgres://postgres@127.0.0.1:{port}/chat" in output
    assert HOW_TO_START["database"] in output
    assert "Traceback" not in output
    assert "honcho start" not in result.stdout  # it stopped before starting anything


def test_secret_key_is_written_once_to_a_private_env_file(tmp_path):
    def secret_key_step() -> subprocess.CompletedProcess:
        parent = {
            k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "SECRET_KEY")
        }
        return subprocess.run(
            ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "secret-key"],
            cwd=tmp_path,
            env=parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    secret_key_step()
    first = (tmp_path / ".env").read_text()
    secret_key_step()

    assert (tmp_path / ".env").read_text() == first
    key = re.fullmatch(r"SECRET_KEY=(\S+)\n", first).group(1)
    assert len(key) >= 50 and len(set(key)) >= 5  # what `check --deploy` asks of a key
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_run_and_test_install_haproxy_before_they_need_it():
    for target, first_use in (("run", "honcho start"), ("test", "pytest")):
        dry_run = make("-n", target)

        assert dry_run.returncode == 0, dry_run.stderr
        install = dry_run.stdout.find("apt-get install -y -qq --no-install-recommends haproxy")
        assert -1 < install < dry_run.stdout.find(first_use), dry_run.stdout
