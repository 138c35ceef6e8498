"""How code inside a durable function reaches its run: calls, time, randomness, logging."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import random as _random
import sys
import uuid
from collections.abc import Awaitable, Coroutine, Generator, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import any_pb2

from ._loop import DurableLoop

if TYPE_CHECKING:
    from ._runner import Run

__all__ = [
    "ATTEMPT",
    "DurableCall",
    "TailCall",
    "current_run",
    "deprecate_patch",
    "durable_call",
    "get_logger",
    "in_durable_function",
    "now",
    "patched",
    "random",
    "run_on_host",
    "uuid4",
]

_T = TypeVar("_T")

ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("dispatch_aio_attempt", default=0)
"""The number of the scheduler's attempt a Run request makes (1 for the first; 0: unknown)."""


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

    The call is recorded when the coroutine first runs (awaited, or wrapped in a
    task). One never run is an un-awaited call (``r = other(x)``): the run names
    it, at the user's line, when the function returns or suspends, and it cannot
    be encoded as a value.
    """

    __slots__ = ("_args", "_coro", "_seq", "function", "site")

    def __init__(
        self,
        run: Run,
        function: str,
        input: any_pb2.Any,
        site: str,
        endpoint: str,
        seq: int,
        expiration: float = 0.0,
    ) -> None:
        self._coro: Coroutine[Any, Any, Any] | None = None
        self._args: tuple[Run, any_pb2.Any, str, float] | None = (run, input, endpoint, expiration)
        self._seq = seq
        self.function = function
        self.site = site

    @property
    def started(self) -> bool:
        """Whether the call ran (was awaited, or wrapped in a task)."""
        return self._args is None

    def _start(self) -> Coroutine[Any, Any, Any]:
        if self._coro is None:
            assert self._args is not None
            run, input, endpoint, expiration = self._args
            self._args = None
            # Created only now, so that a call never awaited leaves no coroutine for
            # Python to warn about from inside the SDK: the run names the user's line.
            self._coro = _call(run, self.function, input, self.site, endpoint, expiration)
        return self._coro

    def __hash__(self) -> int:
        return self._seq

    def __repr__(self) -> str:
        state = "" if self.started else "un-awaited "
        return f"<{state}durable call to {self.function!r} made at {self.site or '?'}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a durable call to {self.function!r} (made at {self.site or '?'}) is not a "
            "value: it was not awaited; write `await "
            f"{self.function.rpartition('.')[2]}(...)` to get its result"
        )

    def send(self, value: Any) -> Any:
        """Resume the call."""
        return self._start().send(value)

    def throw(self, *args: Any) -> Any:
        """Raise an exception inside the call."""
        return self._start().throw(*args)

    def close(self) -> None:
        """Close the call."""
        if self._coro is not None:
            self._coro.close()
        else:
            self._args = None  # closed before it ran (a cancelled gather): not pending

    def __await__(self) -> Generator[Any, None, Any]:
        return self._start().__await__()


async def _call(
    run: Run, function: str, input: any_pb2.Any, call_site: str, endpoint: str, expiration: float
) -> Any:
    return await run.make_call(
        function, input, call_site=call_site, endpoint=endpoint, expiration=expiration
    )


def durable_call(
    function: str,
    input: any_pb2.Any,
    *,
    call_site: str = "",
    endpoint: str = "",
    expiration: float = 0.0,
) -> Coroutine[Any, Any, Any]:
    """Return a coroutine that calls ``function`` durably and returns its result.

    ``expiration`` (seconds, 0 for the scheduler's default) is sent as the call's
    ``Call.expiration``: past it the scheduler ends the call with STATUS_TIMEOUT.

    Raises:
        RuntimeError: Called outside a durable function.
    """
    loop = _durable_loop()
    if loop is None:
        raise RuntimeError(f"durable call to {function!r} made outside a durable function")
    run: Run = loop.owner
    call = DurableCall(run, function, input, call_site, endpoint, loop._next_seq(), expiration)
    run.track_call(call)
    return call


def patched(change_id: str) -> bool:
    """Whether the running function takes the new branch of a code change.

    Change a durable function while calls of it are in flight by keeping both
    branches behind a patch id::

        if dispatch_aio.patched("send-receipt"):
            await send_receipt(order)     # new code
        else:
            await send_email(order)       # what runs started before did

    A run that reaches this point live (every new run, and a run started before the
    change that had not reached this point yet) takes the new branch, and its journal
    records the patch id. A run replaying a journal recorded before the change, that
    already passed this point, takes the old branch, so it makes the calls it made
    then and does not diverge. A run answers the same for one id every time it asks.

    Once no journal needs the old branch any more (``dispatch-aio check`` lists the
    stored journals that still do), replace the test with `deprecate_patch` and
    delete the old branch; later, remove that call too.

    Outside a durable function (a plain in-process call) it returns True.

    Args:
        change_id: Names the change; unique within the function, never reused.

    Returns:
        True for the new branch, False for the old one.
    """
    run = current_run()
    return True if run is None else run.patched(change_id)


def deprecate_patch(change_id: str) -> None:
    """Say that the old branch of a `patched` change was removed.

    Put it where ``if patched(change_id):`` was and keep only the new branch. Runs
    still record the patch id, so journals written in between replay against code
    that still tests ``patched(change_id)``; a run replaying a journal that took the
    old branch fails with a divergence that names the patch.

    Args:
        change_id: The id that was given to `patched`.
    """
    run = current_run()
    if run is not None:
        caller = sys._getframe(1)
        run.patched(change_id, deprecated=f"{caller.f_code.co_filename}:{caller.f_lineno}")


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
