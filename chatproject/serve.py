"""The web process: daphne on a uvloop event loop (`python -m chatproject.serve <daphne options>`).

Daphne creates the asyncio loop that Twisted's reactor and every Channels consumer run on when
`daphne.server` is first imported, from the event loop policy in force at that moment, so the
policy is set here before daphne is imported at all. At the issue's load (10 rooms x 10 clients x
2 msg/s) the web process spends most of its CPU on asyncio's own work per delivered frame (task
wake-ups, queues, the Redis channel layer), and uvloop does that work in C (docs/performance.md).
"""

from __future__ import annotations

import asyncio

import uvloop


def event_loop_policy_install() -> None:
    """Make every event loop created from now on a uvloop one."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    event_loop_policy_install()
    from daphne.cli import CommandLineInterface  # imports daphne.server, which creates the loop

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
