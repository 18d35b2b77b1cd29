"""The web process runs daphne on uvloop (chatproject/serve.py)."""

import subprocess
import sys
from pathlib import Path

from chatproject.procfile import child_process_env
from tests.conftest import ROOT

DAPHNE_LOOP_TYPE = (
    "from chatproject.serve import event_loop_policy_install\n"
    "event_loop_policy_install()\n"
    "import daphne.server\n"
    "print(type(daphne.server.twisted_loop).__module__)\n"
)


def test_daphne_creates_its_loop_from_uvloop_once_the_policy_is_installed():
    result = subprocess.run(
        [sys.executable, "-c", DAPHNE_LOOP_TYPE],
        cwd=ROOT,
        env=child_process_env(),
        capture_output=True,
        text=True,
        check=True,
    )

    assert result.stdout.strip().startswith("uvloop")


def test_the_procfile_web_process_runs_with_uvloop_loaded(live_daphne):
    maps = Path(f"/proc/{live_daphne.pid}/maps").read_text()

    assert "/uvloop/loop." in maps
