"""The RabbitMQ nodes behind a broker, as their management API reports them: names, which node
leads a queue, each node's OS process; and killing one, for `bench_priority --kill-leader`.

Any node's management API answers for the whole cluster. The API named by RABBITMQ_MANAGEMENT_URL
lists every node's own management listener, so once that node is gone the others still answer.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

MANAGEMENT_TIMEOUT_SECONDS = 10.0


class NodesUnavailable(Exception):
    """No management API answered, or it did not say what was asked; the message says which."""


@dataclass(frozen=True)
class RabbitNodes:
    """The management API of every node of one cluster (one entry on a single node)."""

    # node name -> its management API's base URL (http://host:port)
    management: dict[str, str]
    user: str
    password: str

    @classmethod
    def discover(cls, management_url: str, *, broker_url: str) -> RabbitNodes:
        """Ask `management_url` for the nodes and their management listeners; NodesUnavailable.

        Credentials in the management URL win (docker-compose sets them there), else the broker
        URL's, else guest.
        """
        api = urllib.parse.urlsplit(management_url)
        broker = urllib.parse.urlsplit(broker_url.split(";")[0])
        user = urllib.parse.unquote(api.username or broker.username or "guest")
        password = urllib.parse.unquote(api.password or broker.password or "guest")
        base = f"{api.scheme}://{api.hostname}" + (f":{api.port}" if api.port else "")
        try:
            overview = _get(base, "overview", user=user, password=password)
        except (OSError, ValueError) as error:  # HTTPError is an OSError
            raise NodesUnavailable(f"the management API at {base}: {error}") from None
        management = {
            listener["node"]: f"{api.scheme}://{api.hostname}:{listener['port']}"
            for listener in overview.get("listeners", [])
            if listener.get("protocol") in ("http", "https")
        }
        if not management:
            raise NodesUnavailable(f"the management API at {base} lists no management listeners")
        return cls(management, user, password)

    @property
    def names(self) -> list[str]:
        return sorted(self.management)

    def get(self, path: str) -> Any:
        """GET /api/<path> from the first node whose management API answers; NodesUnavailable."""
        failures = []
        for node, base in sorted(self.management.items()):
            try:
                return _get(base, path, user=self.user, password=self.password)
            except urllib.error.HTTPError as error:  # it answered: that is the answer
                raise NodesUnavailable(f"{base}/api/{path} answered HTTP {error.code}") from None
            except (OSError, ValueError) as error:
                failures.append(f"{node}: {error}")
        raise NodesUnavailable("no management API answered: " + "; ".join(failures))

    def queue_leader(self, *, vhost: str, queue: str) -> str | None:
        """The node that leads a quorum queue (or holds a classic one); None until the
        management API has sampled a new queue."""
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


def _get(base: str, path: str, *, user: str, password: str) -> Any:
    request = urllib.request.Request(f"{base}/api/{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT_SECONDS) as response:
        return json.load(response)
