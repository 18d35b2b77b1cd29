"""A TCP forwarder that tests close or blackhole to simulate an outage without touching the shared service."""

from __future__ import annotations

import socket
import threading


class _Link:
    """One client connection and, when forwarded, its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        # Set by a blackhole: bytes are dropped, and so is a FIN, as a network partition would.
        self.partitioned = upstream is None

    def sockets(self) -> list[socket.socket]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`; closing it looks like an outage of that service.

    Lets a test cut a process off RabbitMQ or PostgreSQL without stopping what other runs share.
    `blackhole()` instead stops forwarding without closing anything: the peer is gone without a
    FIN or RST, which only a timeout or a heartbeat can notice.
    """

    def __init__(self, port: int, target: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.port = port
        self.target = target
        self._server: socket.socket | None = None
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._blackholed = False

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def blackhole(self) -> None:
        """Forward nothing more, close nothing: open connections and new ones hear nothing at all."""
        with self._lock:
            self._blackholed = True
            for link in self._links:
                link.partitioned = True

    def forward(self) -> None:
        """End the blackhole: new connections are forwarded again.

        The connections that lived through it are closed: bytes were dropped, so neither end
        could make sense of them any more (after a real partition, a TCP reset ends them).
        """
        with self._lock:
            self._blackholed = False
            broken = [link for link in self._links if link.partitioned]
            self._links = [link for link in self._links if not link.partitioned]
        for link in broken:
            _close(link.sockets())

    def close(self) -> None:
        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone leaves the kernel
            # socket listening for as long as that accept() holds it.
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            _close(link.sockets())

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._blackholed:
                    # Accepted, then silence: the client's handshake times out.
                    self._links.append(_Link(client, None))
                    continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                # The target refuses (a RabbitMQ node still starting): the client's connection is
                # closed, as the target's own refusal would be, and the proxy goes on accepting.
                _close([client])
                continue
            link = _Link(client, upstream)
            with self._lock:
                link.partitioned = self._blackholed  # a blackhole may have begun meanwhile
                self._links.append(link)
            threading.Thread(target=self._pipe, args=(link, client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(link, upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not link.partitioned:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            if not link.partitioned:
                for sock in (source, sink):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
