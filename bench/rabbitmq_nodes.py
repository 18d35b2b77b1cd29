"""The RabbitMQ nodes behind CELERY_BROKER_URL, as their management APIs report them: their names,
which node leads a queue, each node's OS process; and killing one, for `bench_priority --kill-leader`.

The APIs are RABBITMQ_MANAGEMENT_URL's (one per node on a cluster, deadletters.selectors reads them
the same way), each answering for the whole cluster: the first that answers is asked, so once a
node is killed the others still answer.
"""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.parse
from dataclasses import dataclass
from typing import Any

from deadletters.selectors import ManagementApi, management_apis


class NodesUnavailable(Exception):
    """No management API answered, or one refused; the message says which and why."""


@dataclass(frozen=True)
class RabbitNodes:
    apis: tuple[ManagementApi, ...]
    names: tuple[str, ...]  # every node of the cluster (one on a single node)

    @classmethod
    def discover(cls, broker_url: str) -> RabbitNodes:
        """The nodes, from the first of RABBITMQ_MANAGEMENT_URL's APIs that answers; NodesUnavailable."""
        apis = tuple(management_apis(broker_url))
        if not apis:
            raise NodesUnavailable("RABBITMQ_MANAGEMENT_URL is empty")
        nodes = cls(apis, ())
        return cls(apis, tuple(sorted(node["name"] for node in nodes.get("nodes"))))

    def get(self, path: str) -> Any:
        """GET /api/<path> from the first management API that answers; NodesUnavailable."""
        failures = []
        for api in self.apis:
            try:
                return api.get(path)
            except urllib.error.HTTPError as error:  # it answered: the others would say the same
                raise NodesUnavailable(f"{api.base}/api/{path} answered HTTP {error.code}") from None
            except (OSError, ValueError) as error:
                failures.append(f"{api.base}: {error}")
        raise NodesUnavailable("no management API answered: " + "; ".join(failures))

    def queue_leader(self, *, vhost: str, queue: str) -> str | None:
        """The node that leads a quorum queue (or holds a classic one); None until the management
        API has sampled a new queue."""
        info = self.get(f"queues/{_quoted(vhost)}/{_quoted(queue)}")
        return info.get("leader") or info.get("node")

    def os_pid(self, node: str) -> int:
        """The operating-system pid of `node`'s Erlang VM (beam.smp)."""
        info = self.get(f"nodes/{_quoted(node)}")
        if not info.get("running") or not info.get("os_pid"):
            raise NodesUnavailable(f"{node} is not running")
        return int(info["os_pid"])

    def kill(self, node: str) -> int:
        """SIGKILL `node`'s VM on this machine, as if its host died; returns its pid."""
        pid = self.os_pid(node)
        try:
            os.kill(pid, signal.SIGKILL)
        except PermissionError:
            raise NodesUnavailable(
                f"not allowed to kill {node} (pid {pid}): run as root or as the nodes' user"
            ) from None
        except ProcessLookupError:
            raise NodesUnavailable(f"{node} (pid {pid}) is not a process on this machine") from None
        return pid


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")
