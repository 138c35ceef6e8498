"""How code inside a durable function reaches its run: calls, time, randomness, logging."""

from __future__ import annotations

import asyncio
import datetime
import logging
import random as _random
import uuid
from collections.abc import Awaitable, Coroutine, Generator, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import any_pb2

from ._loop import DurableLoop

if TYPE_CHECKING:
    from ._runner import Run

__all__ = [
    "TailCall",
    "current_run",
    "durable_call",
    "get_logger",
    "in_durable_function",
    "now",
    "random",
    "run_on_host",
    "uuid4",
]

_T = TypeVar("_T")


class TailCall(BaseException):
    """Signal that ends a durable function by handing its call over to another function.

    It derives from BaseException so that ``except Exception`` in user code
    does not swallow it; do not catch it with a bare ``except:``.
    """

    def __init__(self, function: str, input: any_pb2.Any) -> None:
        super().__init__(f"tail call to {function!r}")
        self.function = function
        self.input = input


def _durable_loop() -> DurableLoop | None:
    loop = asyncio.events._get_running_loop()
    return loop if isinstance(loop, DurableLoop) else None


def current_run() -> Run | None:
    """Return the durable run executing the calling code, or None outside one."""
    loop = _durable_loop()
    return None if loop is None else loop.owner


def in_durable_function() -> bool:
    """Whether the calling code runs inside a durable function run by Dispatch."""
    return _durable_loop() is not None


class DurableCall(Coroutine[Any, Any, Any]):
    """The coroutine of a durable call, hashed by creation order.

    asyncio.as_completed() puts what it is given in a set before wrapping each
    item in a task; plain coroutines hash by address, which would make the
    order of those tasks, and so the identities of their calls, differ on
    replay. This wrapper hashes by a sequence number of its loop instead.
    """

    __slots__ = ("_coro", "_seq")

    def __init__(self, coro: Coroutine[Any, Any, Any], seq: int) -> None:
        self._coro = coro
        self._seq = seq

    def __hash__(self) -> int:
        return self._seq

    def send(self, value: Any) -> Any:
        """Resume the call."""
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        """Raise an exception inside the call."""
        return self._coro.throw(*args)

    def close(self) -> None:
        """Close the call."""
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._coro.__await__()


async def _call(run: Run, function: str, input: any_pb2.Any, call_site: str, endpoint: str) -> Any:
    return await run.make_call(function, input, call_site=call_site, endpoint=endpoint)


def durable_call(
    function: str, input: any_pb2.Any, *, call_site: str = "", endpoint: str = ""
) -> Coroutine[Any, Any, Any]:
    """Return a coroutine that calls ``function`` durably and returns its result.

    Raises:
        RuntimeError: Called outside a durable function.
    """
    loop = _durable_loop()
    if loop is None:
        raise RuntimeError(f"durable call to {function!r} made outside a durable function")
    run: Run = loop.owner
    return DurableCall(_call(run, function, input, call_site, endpoint), loop._next_seq())


def now() -> datetime.datetime:
    """Return the current time as an aware UTC datetime.

    Inside a durable function this is durable time: the recorded time while
    replaying, so code that branches on it replays identically. Outside one
    it is the wall clock.
    """
    loop = _durable_loop()
    if loop is None:
        return datetime.datetime.now(datetime.UTC)
    seconds = loop.unix_time()
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def random() -> float:
    """Return a random float in [0, 1) that replays identically inside a durable function."""
    run = current_run()
    return run.random.random() if run is not None else _random.random()


def uuid4() -> uuid.UUID:
    """Return a random UUID (version 4) that replays identically inside a durable function."""
    run = current_run()
    if run is None:
        return uuid.uuid4()
    return uuid.UUID(int=run.random.getrandbits(128), version=4)


async def run_on_host(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` on the host event loop and return its result.

    Objects created outside a durable function (an application-wide aiohttp
    session, a database pool) belong to the host loop and cannot be awaited
    directly inside one. Wrap the code that uses them::

        rows = await dispatch_aio.run_on_host(pool.fetch("select 1"))

    Its result is not journaled: the code runs again on replay.
    """
    loop = _durable_loop()
    if loop is None:
        return await awaitable
    return await loop.run_on_host(awaitable)


class _ReplayAwareAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    def isEnabledFor(self, level: int) -> bool:
        loop = _durable_loop()
        if loop is not None and loop.replaying:
            return False
        return bool(self.logger.isEnabledFor(level))

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


def get_logger(name: str) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """Return a logger that stays quiet while a durable function replays.

    Without it every replay would repeat the log lines of the code it
    re-executes.
    """
    return _ReplayAwareAdapter(logging.getLogger(name), {})
