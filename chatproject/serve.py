"""The web process: daphne on a uvloop event loop (`python -m chatproject.serve <daphne options>`),
stopping gracefully on SIGTERM.

Daphne creates the asyncio loop that Twisted's reactor and every Channels consumer run on when
`daphne.server` is first imported, from the event loop policy in force at that moment, so the
policy is set here before daphne is imported at all. Under load the web process spends most of
its CPU on asyncio's own work per delivered frame (task wake-ups, queues, the Redis channel
layer), and uvloop does that work in C.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import uvloop

# Views whose URL carries a credential: the password reset link's uid and token.
CREDENTIAL_URL_NAMES = frozenset({"password_reset_confirm"})
# The close code of "service restart" (RFC 6455's registry): the page reconnects at once, to another
# process, instead of backing off as after a failure.
CLOSE_SERVICE_RESTART = 1012
# How often a shutting-down process looks whether its connections are done.
SHUTDOWN_POLL_SECONDS = 0.1

logger = logging.getLogger("chatproject.serve")


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


def access_log_quiet_for(uri: str) -> bool:
    """The load balancer's health checks, one a second from each balancer: not worth a log line each."""
    from monitoring.views import LOAD_BALANCER_CHECK_URI

    return uri == LOAD_BALANCER_CHECK_URI


def access_log_redacting_install() -> None:
    """Daphne's access log writes every request's path; a reset link's token would be in the log.
    The load balancer's health checks are left out."""
    import daphne.cli
    from daphne.access import AccessLogGenerator

    class RedactingAccessLog(AccessLogGenerator):
        def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
            if "path" in details:
                if access_log_quiet_for(details["path"]):
                    return
                details = {**details, "path": path_redacted(details["path"])}
            super().__call__(protocol, action, details)

    # The CLI builds its access logger from this name.
    daphne.cli.AccessLogGenerator = RedactingAccessLog


def graceful_server_install() -> None:
    """Make daphne's CLI run GracefulServer (below) instead of its Server."""
    import daphne.cli
    from daphne.server import Server
    from daphne.ws_protocol import WebSocketProtocol
    from django.conf import settings
    from twisted.internet import reactor

    from infrastructure import shutdown

    class GracefulServer(Server):
        """Daphne's server, which on SIGTERM hands its clients over to the other web processes:

        1. for WEB_DRAIN_SECONDS it serves as before, but /healthz says it is shutting down, so the
           load balancer takes it out of rotation while nothing is refused yet;
        2. it stops listening and closes every WebSocket with 1012: pages reconnect at once, through
           the load balancer, to another process, resend what was not acknowledged (same
           client_id, stored once) and replay what they missed (`since`);
        3. once each connection's application is done (a closed socket's consumer still stores the
           frames it had received; a request completes), or after WEB_SHUTDOWN_SECONDS, the reactor
           stops, as daphne's own SIGTERM does at once.
        """

        def run(self) -> None:
            self.listening_ports: list[Any] = []
            # After start-up, when Twisted has installed its own handler (stop at once) to replace.
            reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._sigterm_received)
            super().run()

        def listen_success(self, port: Any) -> None:
            self.listening_ports.append(port)
            super().listen_success(port)

        def _sigterm_received(self, signum: int, frame: Any) -> None:
            reactor.callFromThread(self.graceful_stop_begin)

        def graceful_stop_begin(self) -> None:
            if shutdown.shutdown_began():
                return  # a second SIGTERM changes nothing
            shutdown.shutdown_begin()
            logger.info(
                "SIGTERM: failing health checks for %gs, then closing sockets with %d",
                settings.WEB_DRAIN_SECONDS,
                CLOSE_SERVICE_RESTART,
            )
            reactor.callLater(settings.WEB_DRAIN_SECONDS, self._listening_stop)

        def _listening_stop(self) -> None:
            for port in self.listening_ports:
                port.stopListening()
            self._shutdown_deadline = time.monotonic() + settings.WEB_SHUTDOWN_SECONDS
            self._sockets_close_and_wait()

        def _sockets_close_and_wait(self) -> None:
            busy = 0
            for protocol, details in list(self.connections.items()):
                if isinstance(protocol, WebSocketProtocol) and protocol.state == protocol.STATE_OPEN:
                    # Not sendClose: autobahn lets applications send only 1000 and 3000-4999.
                    protocol.sendCloseFrame(code=CLOSE_SERVICE_RESTART)
                application = details.get("application_instance")
                if application is not None and not application.done():
                    busy += 1
            if busy and time.monotonic() < self._shutdown_deadline:
                # Handshakes still in progress are closed at a later pass, once open.
                reactor.callLater(SHUTDOWN_POLL_SECONDS, self._sockets_close_and_wait)
                return
            if busy:
                logger.warning(
                    "%d connections were still busy after %gs", busy, settings.WEB_SHUTDOWN_SECONDS
                )
            reactor.stop()

    daphne.cli.CommandLineInterface.server_class = GracefulServer


def main() -> None:
    event_loop_policy_install()
    from chatproject.startup import settings_load_or_exit

    settings_load_or_exit()
    from daphne.cli import CommandLineInterface  # imports daphne.server, which creates the loop

    access_log_redacting_install()
    graceful_server_install()
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
