"""The web process runs daphne on uvloop (chatproject/serve.py)."""

import subprocess
import sys
from pathlib import Path

from bench.procfile import child_process_env
from tests.conftest import ROOT

# Runs the launcher as `python -m chatproject.serve --help` does: daphne parses the options and
# exits, and at exit the loop daphne.server created is reported.
SERVE_AND_REPORT_LOOP = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print(type(sys.modules['daphne.server'].twisted_loop).__module__))\n"
    "sys.argv = ['chatproject.serve', '--help']\n"
    "runpy.run_module('chatproject.serve', run_name='__main__')\n"
)


def test_the_launcher_makes_daphne_create_a_uvloop_loop():
    result = subprocess.run(
        [sys.executable, "-c", SERVE_AND_REPORT_LOOP],
        cwd=ROOT,
        env=child_process_env(),
        capture_output=True,
        text=True,
        check=True,
    )

    assert result.stdout.strip().splitlines()[-1].startswith("uvloop")


def test_the_procfile_web_process_runs_with_uvloop_loaded(live_daphne):
    maps = Path(f"/proc/{live_daphne.pid}/maps").read_text()

    assert "/uvloop/loop." in maps
