"""Plain ``def`` functions registered with Dispatch: leaf functions run in a thread or process."""

from __future__ import annotations

__all__ = ["EXECUTORS", "Executor", "ProcessPools", "sync_runner"]

import asyncio
import concurrent.futures
import functools
import importlib
from collections.abc import Callable, Coroutine
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

Executor = Literal["thread", "process"]
EXECUTORS: tuple[Executor, ...] = ("thread", "process")


class ProcessPools:
    """The process pool of a `Dispatch` object, started at its first use."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def get(self) -> concurrent.futures.ProcessPoolExecutor:
        """Return the pool, starting it if needed."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor()
        return self._pool

    def discard(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        """Drop a pool that broke (a process died or could not start); the next use starts one."""
        if self._pool is pool:
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        """Stop the pool's processes once their work is done (without waiting)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _call_by_name(module: str, qualname: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a registered function in a pool process, found by its module and name.

    The decorated name holds the `Function`, not the plain function, so the plain
    function cannot be pickled by reference: the worker looks it up instead.
    """
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    target = getattr(target, "__wrapped__", target)
    return target(*args, **kwargs)


def _broken(fn: Callable[..., Any], exc: BaseException) -> BrokenProcessPool:
    return BrokenProcessPool(
        f"the process that runs {fn.__qualname__!r} (executor='process') could not start or "
        f"ended without an answer ({type(exc).__name__}: {exc}): it crashed or was killed, "
        "or the app failed in it. Such a process imports the app's main module where Python "
        "starts it afresh (on Python 3.14 and later, on macOS and on Windows): code that "
        'starts the app at the top level of its script must be under `if __name__ == "__main__":`'
    )


def sync_runner(
    fn: Callable[..., Any],
    executor: Executor,
    pools: Callable[[], ProcessPools | None],
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Return a coroutine function running ``fn`` in a thread or a process.

    Inside a durable function the executor is the host loop's: the durable loop
    forwards ``run_in_executor`` there, and the run waits for it as for any I/O.
    The thread or process does not run in the durable function's context, so
    ``fn`` cannot make durable calls.
    """
    if executor == "process" and "<locals>" in fn.__qualname__:
        raise TypeError(
            f"{fn.__qualname__!r} is defined inside a function: executor='process' runs "
            "functions defined at module level only (the worker imports them by name); "
            "move it to module level or use executor='thread'"
        )

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        if executor == "process":
            work = functools.partial(_call_by_name, fn.__module__, fn.__qualname__, args, kwargs)
            owner = pools()
            if owner is None:
                return await loop.run_in_executor(None, work)
            pool = owner.get()
            try:
                done = loop.run_in_executor(pool, work)  # starts the processes: may fail
            except (BrokenProcessPool, OSError) as exc:
                owner.discard(pool)
                raise _broken(fn, exc) from exc
            try:
                return await done
            except BrokenProcessPool as exc:
                owner.discard(pool)
                raise _broken(fn, exc) from exc
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    return run
