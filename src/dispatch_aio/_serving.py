"""Serving aiohttp applications so that slow or idle clients cannot starve them.

Both servers of the package (the function endpoint and the scheduler's API) use these:

- ``IDLE_TIMEOUT``: a connection that has not sent a complete request within that time is
  closed, from its start (aiohttp arms its keep-alive timer when a connection opens) as
  well as between requests. It is longer than the 15 s after which aiohttp's client
  closes idle pooled connections, so a client normally closes first.
- `ConnectionGuard`: at most ``limit`` connections. When a new one would pass the limit,
  the oldest connection without a request in progress is closed to make room (a
  half-open connection of a flood, or an idle keep-alive one), so clients that do send
  requests keep being served; only when every connection is busy is the new one refused.
- `raise_file_limit`: the soft limit on open files is raised to the hard one at start, so
  the connection limit, not the file limit, is what a flood reaches.
- Accept errors (``EMFILE`` when the process is out of file descriptors anyway) are logged
  once per minute with a count, instead of a traceback per attempt.
- `tune_garbage_collector`: once a process that is ours alone (``dispatch.run()``, the
  ``dispatch-aio`` commands) has started, what it holds is set aside from the cyclic
  garbage collector, which would otherwise walk it at every full collection, and the
  collector runs less often.
"""

from __future__ import annotations

__all__ = [
    "IDLE_TIMEOUT",
    "ConnectionGuard",
    "default_connection_limit",
    "quiet_accept_errors",
    "raise_file_limit",
    "tune_garbage_collector",
]

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = 30.0
"""Seconds a connection may stay open without a complete request."""

_REPORT_INTERVAL = 60.0  # seconds between two log lines about the same kind of trouble
_ACCEPT_ERROR = "socket.accept() out of system resource"
_FILE_LIMIT_CAP = 1 << 20


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit."""
    try:
        import resource  # not on Windows
    except ImportError:  # pragma: no cover
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _FILE_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, _FILE_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return int(soft) if soft != resource.RLIM_INFINITY else _FILE_LIMIT_CAP


_GC_THRESHOLDS = (10_000, 20, 20)  # the defaults: (700, 10, 10)


def tune_garbage_collector() -> None:
    """Set the cyclic garbage collector up for a long-running server process.

    The modules, descriptors and settings a server loads at start live as long as it
    does, yet a full collection walks them all: tens of thousands of objects, tens of
    milliseconds each time, several times per thousand calls. So the garbage made
    while starting is collected, and every object left frozen (`gc.freeze`): no
    longer walked.

    Objects made later are collected as before, less often: at the default
    thresholds a scheduler that creates thousands of calls runs a young collection
    every 700 new objects and walks its live calls again and again, finding nothing
    (a finished run is freed by reference counting), a tenth of its time in a batch
    of 2,000 calls. Collections run 14 times less often here; garbage in cycles is
    freed a little later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def default_connection_limit(file_limit: int) -> int:
    """A connection limit that leaves most file descriptors to the rest of the process."""
    return max(64, min(4096, file_limit // 4))


class ConnectionGuard:
    """Caps the connections of one aiohttp server (see the module docstring).

    Add `middleware` to the application, then `attach` the runner's server once the
    runner is set up.

    Args:
        limit: Connections open at most.
        name: What the server is, for log lines.
    """

    def __init__(self, limit: int, name: str) -> None:
        if limit <= 0:
            raise ValueError(f"the connection limit must be positive, got {limit!r}")
        self._limit = limit
        self._name = name
        self._busy: dict[RequestHandler, int] = {}  # requests in progress per connection
        self._reported = 0.0
        self._evicted = 0

    @property
    def limit(self) -> int:
        """Connections open at most."""
        return self._limit

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Mark the request's connection busy while its handler runs."""
        protocol = request.protocol
        self._busy[protocol] = self._busy.get(protocol, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._busy.pop(protocol) - 1
            if left:
                self._busy[protocol] = left

    def attach(self, server: web.Server) -> None:
        """Enforce the limit on the connections `server` accepts."""
        accepted = server.connection_made

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            accepted(handler, transport)
            self._enforce(server, handler)

        # An instance attribute: this server only, whatever aiohttp's class does.
        server.connection_made = connection_made  # type: ignore[method-assign]

    def _enforce(self, server: web.Server, newcomer: RequestHandler) -> None:
        connections = server.connections  # oldest first
        if len(connections) <= self._limit:
            return
        victim = next(
            (c for c in connections if c is not newcomer and not self._busy.get(c)), newcomer
        )
        victim.force_close()
        self._evicted += 1
        now = time.monotonic()
        if now - self._reported >= _REPORT_INTERVAL:
            self._reported = now
            logger.warning(
                "%s: %d connections open, the limit: closed %d idle or half-open "
                "connection(s) to make room (a slow or flooding client?)",
                self._name,
                self._limit,
                self._evicted,
            )
            self._evicted = 0


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log the loop's accept errors once per minute instead of once per attempt.

    Other exceptions go to the handler the loop had. Installing twice does nothing.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "_quiets_accept_errors", False):
        return
    state = {"reported": 0.0, "count": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_ERROR:
            if previous is None:
                loop.default_exception_handler(context)
            else:
                previous(loop, context)
            return
        state["count"] += 1
        now = time.monotonic()
        if now - state["reported"] >= _REPORT_INTERVAL:
            logger.error(
                "cannot accept connections: %s (%d time(s) in the last minute); the process "
                "is out of file descriptors",
                context.get("exception"),
                state["count"],
            )
            state["reported"], state["count"] = now, 0

    handler._quiets_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
