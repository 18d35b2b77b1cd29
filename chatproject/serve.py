"""The web process: daphne on a uvloop event loop (`python -m chatproject.serve <daphne options>`).

Daphne creates the asyncio loop that Twisted's reactor and every Channels consumer run on when
`daphne.server` is first imported, from the event loop policy in force at that moment, so the
policy is set here before daphne is imported at all. Under load the web process spends most of
its CPU on asyncio's own work per delivered frame (task wake-ups, queues, the Redis channel
layer), and uvloop does that work in C.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

# Views whose URL carries a credential: the password reset link's uid and token.
CREDENTIAL_URL_NAMES = frozenset({"password_reset_confirm"})


def event_loop_policy_install() -> None:
    """Make every event loop created from now on a uvloop one."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def path_redacted(uri: str) -> str:
    """`uri` for the access log, with the arguments of CREDENTIAL_URL_NAMES' paths replaced by ***."""
    from django.urls import Resolver404, resolve

    path, mark, query = uri.partition("?")
    try:
        match = resolve(path)
    except Resolver404:
        return uri
    if match.url_name not in CREDENTIAL_URL_NAMES:
        return uri
    for value in match.kwargs.values():
        path = path.replace(f"/{value}/", "/***/")
    return path + mark + query


def access_log_redacting_install() -> None:
    """Daphne's access log writes every request's path; a reset link's token would be in the log."""
    import daphne.cli
    from daphne.access import AccessLogGenerator

    class RedactingAccessLog(AccessLogGenerator):
        def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
            if "path" in details:
                details = {**details, "path": path_redacted(details["path"])}
            super().__call__(protocol, action, details)

    # The CLI builds its access logger from this name.
    daphne.cli.AccessLogGenerator = RedactingAccessLog


def main() -> None:
    event_loop_policy_install()
    from chatproject.startup import settings_load_or_exit

    settings_load_or_exit()
    from daphne.cli import CommandLineInterface  # imports daphne.server, which creates the loop

    access_log_redacting_install()
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
