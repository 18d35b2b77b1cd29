"""How `make test` spreads the suite over its pytest-xdist workers (`-n`).

Every test is a unit of its own, handed to whichever worker is free, except the cluster tests
(tests/cluster), which form one unit: one worker runs them all, in order, so a run starts one
RabbitMQ cluster (not one per worker), a module's node-stopping fixture runs once, and no two
tests break nodes of the same cluster at once.

xdist's own `--dist loadgroup` would do this from an `xdist_group` marker, but it works by
rewriting each test's id, which pytest 9 no longer allows: its groups end up split over the
workers. xdist's scheduler hook is the supported way in.
"""

from __future__ import annotations

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

CLUSTER_TESTS = "tests/cluster/"


class ClusterTestsTogether(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return CLUSTER_TESTS if nodeid.startswith(CLUSTER_TESTS) else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadScopeScheduling | None:
    # Only for the default distribution (`-n` alone); an explicit --dist keeps its meaning.
    if config.getvalue("dist") != "load":
        return None
    return ClusterTestsTogether(config, log)
