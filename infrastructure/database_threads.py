"""The web process's threads that use the database: a fixed number, each closing its idle connection.

Django keeps one PostgreSQL connection per thread that has queried (for DB_CONN_MAX_AGE seconds),
so a process holds as many connections as such threads. Django's ASGIHandler runs the synchronous
part of every HTTP request on a thread of its own (asgiref's ThreadSensitiveContext makes a new
one-thread executor per request); when that thread ends, its connection stays open until the
garbage collector frees the thread's DatabaseWrapper, a reference cycle, and the web process
collects rarely (chatproject/asgi.py), so every page view would leave an idle connection behind
until PostgreSQL's `max_connections` runs out.

Here every HTTP request borrows one of WEB_HTTP_THREADS long-lived threads instead, and the socket
writes run on a pool of their own, so the process's connections are bounded by its thread count
(docs/architecture.md states the bound). Each thread reuses its connection while busy and closes
it after DB_CONN_IDLE_SECONDS without work.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.db import connections

AsgiApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class DatabaseThreadPool(Executor):
    """`size` threads that run submitted calls from one queue and close idle database connections.

    A thread that has had no call for `idle_seconds` closes its own connections (Django's are
    per thread, so only that thread can close them safely), and opens one again on its next query.
    Threads start on the first call and live as long as the process.
    """

    def __init__(self, *, size: int, name: str, idle_seconds: float) -> None:
        self.size = size
        self._name = name
        self._idle_seconds = idle_seconds
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple, dict] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if len(self._threads) < self.size:
            self._start_threads()
        future: Future[Any] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._calls.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _start_threads(self) -> None:
        with self._start_lock:
            while len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _run(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self._idle_seconds)
            except queue.Empty:
                connections.close_all()
                continue
            if call is None:
                connections.close_all()
                return
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # handed to the caller, as ThreadPoolExecutor does
                future.set_exception(error)


class BoundedHttpThreads:
    """ASGI middleware: each HTTP request runs its synchronous part on one of `size` threads.

    A request waits for a free thread when all are busy, so at most `size` requests run Django's
    synchronous code at once. The most recently freed thread is lent first: under light traffic
    a few threads keep warm connections while the others go idle and close theirs.
    """

    def __init__(self, app: AsgiApp, *, size: int, idle_seconds: float) -> None:
        self.app = app
        self.threads = [
            DatabaseThreadPool(size=1, name=f"http-{i}", idle_seconds=idle_seconds) for i in range(size)
        ]
        self._free: asyncio.LifoQueue[DatabaseThreadPool] = asyncio.LifoQueue()
        for thread in reversed(self.threads):
            self._free.put_nowait(thread)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        thread = await self._free.get()
        try:
            # Django's own ThreadSensitiveContext, entered inside this one, then uses this thread
            # instead of making a new one.
            async with ThreadSensitiveContext(executor=thread):
                await self.app(scope, receive, send)
        finally:
            self._free.put_nowait(thread)
