"""bench/procfile.py, which starts the Procfile's processes for the tests and the benchmarks."""

import pytest

from bench.procfile import ProcessNotReady, ProcfileProcess, child_process_env


@pytest.mark.django_db
def test_a_child_that_never_gets_ready_is_killed_not_left_running():
    child = ProcfileProcess(["sleep", "600"], env=child_process_env(), ready=lambda: False)

    with pytest.raises(ProcessNotReady, match="was not ready"):
        child.start(timeout=0.5)

    assert child.poll() is not None
