"""DurableLoop: the event loop that durable functions run on.

The loop is stepped by its owner (the run in ``_runner.py``) from the host
event loop: each step installs the durable loop as the running loop, runs the
ready callbacks in FIFO order until none are left, and restores the host loop.
It never runs by itself. I/O (sockets, DNS, executors, subprocesses) is
forwarded to the host loop, whose results complete futures of this loop and
wake its owner.

Identity only for what the program decides. A durable operation's identity is
the path of the task that made it plus a per-task counter, so anything that
takes an identity must be made the same number of times, in the same order, on
every replay. Library code does not promise that: aiohttp arms a timeout per
chunk read, starts a DNS task when its cache has expired, a writer task per
request... in numbers that follow I/O timing. So:

- Durable calls always take an identity.
- A timer (``call_at``/``call_later``, and so ``sleep``, ``timeout``,
  ``wait_for``) is durable when a task made it and the program decided it: the
  innermost frame asking for it that is neither the standard library (asyncio's
  own helpers, contextlib...) nor dispatch_aio belongs to the program. Frames of
  third-party packages (files under site-packages or dist-packages) are library
  code; the package of the function being run is the program wherever it is
  installed. A program's callback passed to a library still decides for itself.
- A task takes the next child path of its parent under the same rule; a task a
  library starts gets a path of its own (``parent.~n``, counted apart) and one
  started on the host loop by I/O (a server's connection handler) gets
  ``~ioN``: neither moves the program's paths. (Durable operations made in
  such a task, by a program callback the library runs there, are identified
  by its path, which holds only if the library starts its tasks alike.)
- Everything else is volatile: it has no identity, is not journaled, and is
  treated as I/O. A volatile timer counts real seconds from when it was armed
  (its clock deadline), live and on replay; while one is pending and no durable
  call is, the run waits for it as it waits for an open connection.

The rule looks only at code (module names and file locations), never at
timing, so a replay in any process of the same deployment classifies alike.

Every use of asyncio's private API is in this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import logging
import math
import os
import re
import sys
import threading
import time
import types
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

from ..errors import HostLoopError

__all__ = ["Clock", "DurableFuture", "DurableLoop", "DurableTask", "Timer", "host_loop_error"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How code that arms a timer or starts a task counts (see _program_decides()).
_PROGRAM, _LIBRARY, _TRANSPARENT = "program", "library", "transparent"
_PACKAGE = __name__.partition(".")[0]

_HASH_BASES = 4096
_HASH_SHIFT = 48
# A single callback running longer than this blocks the whole endpoint.
_SLOW_CALLBACK = 2.0
# Before declaring a function stuck, wait this long for late I/O callbacks.
_LINGER_STEP = 0.01
_LINGER_STEPS = 50
# How often to look whether a thread the function started has ended.
_THREAD_POLL = 0.05

_HOST_LOOP_HINT = (  # see host_loop_error()
    "it belongs to another event loop than the host's (another run's: every run of a "
    "durable function, and every replay of one, has a loop of its own; or another "
    "thread's); create it inside the function, or share results through durable calls"
)
# asyncio's record of the current task of each loop, as asyncio.current_task(loop) reads
# it for a loop that is not the running one (the host loop while a durable task steps).
_CURRENT_TASKS: dict[asyncio.AbstractEventLoop, asyncio.Task[Any] | None] = getattr(
    asyncio.tasks, "_current_tasks", {}
)
if sys.version_info >= (3, 14):
    # One current task per thread, not per loop: a host task that steps a durable loop
    # steps aside while the durable tasks run (see _install()).
    from asyncio.tasks import _swap_current_task
_OTHER_LOOP = re.compile(r"got (?:Future )?(.*) attached to a different loop", re.DOTALL)


def _install(
    loop: asyncio.AbstractEventLoop,
) -> tuple[asyncio.AbstractEventLoop | None, asyncio.Task[Any] | None]:
    """Make `loop` the running loop; return what to give back to `_uninstall()`."""
    host = asyncio.events._get_running_loop()
    hidden = None
    if sys.version_info >= (3, 14) and host is not None:
        # Python 3.14 refuses to enter a task while another is current in the thread.
        hidden = _swap_current_task(host, None)
    asyncio.events._set_running_loop(loop)
    return host, hidden


def _uninstall(host: asyncio.AbstractEventLoop | None, hidden: asyncio.Task[Any] | None) -> None:
    """Give the running loop, and its current task, back to the host."""
    asyncio.events._set_running_loop(host)
    if sys.version_info >= (3, 14) and hidden is not None:
        _swap_current_task(host, hidden)


def host_loop_error(exc: BaseException | None) -> HostLoopError | None:
    """Explain an error of an object used on the wrong event loop, if ``exc`` is one.

    The C task implementation throws it straight into the coroutine, so it is
    explained where it leaves the function rather than where it is raised. The
    explanation names what was awaited, as asyncio describes it.
    """
    if type(exc) is not RuntimeError:
        return None
    text = str(exc)
    if "attached to a different loop" in text:
        match = _OTHER_LOOP.search(text)
        what = match.group(1) if match else "an object"
        error = HostLoopError(f"a durable function awaited {what}: {_HOST_LOOP_HINT}")
    elif text.endswith(" is bound to a different event loop"):
        # asyncio's Lock, Semaphore, Event, Condition, Queue, Barrier: bound to the
        # first loop that waits on them.
        what = text.removesuffix(" is bound to a different event loop")
        error = HostLoopError(
            f"a durable function used {what}, which was created outside it and is bound to "
            "another event loop (the host's, or another run's: every run of a durable "
            "function, and every replay of one, has a loop of its own); create it inside "
            "the function and pass it to the tasks that share it. State shared between "
            "runs does not replay: share it through durable calls instead"
        )
    elif text == "Timeout context manager should be used inside a task":
        # aiohttp's timeouts look their task up on the session's loop. Python 3.14 keeps
        # one current task per thread, so a durable task is never current on the host loop.
        error = HostLoopError(
            "a durable function used an aiohttp ClientSession created outside it, on the "
            "app's event loop: its timeouts look up the current task on that loop, which "
            "Python 3.14 and later cannot show there while a durable function runs; create "
            "the session inside the function, or run the request on the app's loop with "
            "dispatch_aio.run_on_host()"
        )
    else:
        return None
    error.__cause__ = exc
    return error


class Clock:
    """The wall clock of live runs; tests substitute a virtual one."""

    def time(self) -> float:
        """Return the current time in unix seconds."""
        return time.time()

    async def wait(self, wake: asyncio.Event, deadline: float | None, *, idle: bool) -> None:
        """Wait on the host loop until ``wake`` is set or the clock reaches ``deadline``.

        ``idle`` says that nothing but timers can wake the loop (no I/O in
        flight): a virtual clock may then jump to the deadline.
        """
        timeout = None if deadline is None else max(0.0, deadline - self.time())
        try:
            async with asyncio.timeout(timeout):
                await wake.wait()
        except TimeoutError:
            pass


class DurableFuture(asyncio.Future[_T]):
    """A future whose hash is its creation number, so sets of them iterate alike on replay."""

    def __init__(self, *, loop: DurableLoop) -> None:
        super().__init__(loop=loop)
        self._seq = loop._next_seq()

    def __hash__(self) -> int:
        return self._seq


class _BridgedFuture(DurableFuture[_T]):
    """The future of an operation forwarded to the host loop.

    Cancelling it cancels the operation there and completes once the operation
    has ended, as awaiting the operation itself would: a task that cancels a
    ``serve_forever()`` finds the server closed when it resumes.
    """

    def __init__(self, *, loop: DurableLoop, host: asyncio.Future[_T]) -> None:
        super().__init__(loop=loop)
        self._host_future = host

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the operation on the host loop; this future follows when it ends."""
        if self.done():
            return False
        if not self._host_future.done():
            return self._host_future.cancel(msg)
        return super().cancel(msg)


class _HostAware(Coroutine[Any, _T, Any]):
    """A task's coroutine, with the futures of host-loop objects it awaits bridged.

    An object created on the host loop (an application-wide aiohttp session, a
    connection pool) makes futures of that loop and awaits them from a durable task:
    asyncio would refuse them ("attached to a different loop"). Each such future the
    coroutine yields is handed to the task as a future of the durable loop that
    follows it (`DurableLoop._bridge`), so the operation runs on the host loop, as
    forwarded I/O does. While it steps, the task is also the host loop's current task:
    such objects look their task up on their own loop (aiohttp's timeouts do) and
    must find, and cancel, the task that awaits them. Python 3.14 keeps one current
    task per thread, the durable loop's then: there such a lookup finds none (see
    `host_loop_error`).
    """

    __slots__ = ("_coro", "_loop", "_task")

    def __init__(self, coro: Coroutine[Any, Any, _T], loop: DurableLoop) -> None:
        self._coro = coro
        self._loop = loop
        self._task: weakref.ref[asyncio.Task[Any]] | None = None

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task that runs the coroutine.

        Held weakly: the task holds the coroutine, and a cycle between them would leave
        every finished run to the garbage collector rather than free it at once.
        """
        return None if self._task is None else self._task()

    @task.setter
    def task(self, task: asyncio.Task[Any]) -> None:
        self._task = weakref.ref(task)

    def send(self, value: Any) -> Any:
        """Resume the coroutine with `value`."""
        host = self._loop._host
        before = _CURRENT_TASKS.get(host)
        _CURRENT_TASKS[host] = self.task
        try:
            return self._bridged(self._coro.send(value))
        finally:
            if before is None:
                _CURRENT_TASKS.pop(host, None)
            else:
                _CURRENT_TASKS[host] = before

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Raise an exception in the coroutine."""
        host = self._loop._host
        before = _CURRENT_TASKS.get(host)
        _CURRENT_TASKS[host] = self.task
        try:
            if val is None and tb is None:
                return self._bridged(self._coro.throw(typ))
            return self._bridged(self._coro.throw(typ, val, tb))
        finally:
            if before is None:
                _CURRENT_TASKS.pop(host, None)
            else:
                _CURRENT_TASKS[host] = before

    def close(self) -> None:
        """Close the coroutine."""
        self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> _HostAware[_T]:
        return self

    def __await__(self) -> Generator[Any, None, _T]:
        return self

    @property
    def cr_frame(self) -> types.FrameType | None:
        """The coroutine's frame (for stacks and tracebacks)."""
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_await(self) -> Any:
        """What the coroutine awaits."""
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_running(self) -> bool:
        """Whether the coroutine runs."""
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_code(self) -> types.CodeType | None:
        """The coroutine's code."""
        return getattr(self._coro, "cr_code", None)

    def _bridged(self, result: Any) -> Any:
        if result is None or not getattr(result, "_asyncio_future_blocking", False):
            return result
        loop = self._loop
        try:
            owner = result.get_loop()
        except AttributeError:
            return result
        if owner is loop or owner is not loop._host:
            return result  # ours, or another loop's: asyncio explains that one
        result._asyncio_future_blocking = False
        follower = loop._bridge(result)
        follower._asyncio_future_blocking = True
        return follower


class DurableTask(asyncio.Task[_T]):
    """A task with a durable path: its parent's path and its index among the parent's children.

    The path, and a counter of durable operations (calls, timers) made by the
    task, give every durable operation an identity that depends only on
    program position.
    """

    def __init__(
        self,
        coro: Coroutine[Any, Any, _T],
        *,
        loop: DurableLoop,
        path: str,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> None:
        self._seq = loop._next_seq()
        self._path = path
        self._children = 0
        self._volatile_children = 0
        self._ops = 0
        # Made by library code or by I/O: its path is not a program position.
        self.volatile = False
        if asyncio.iscoroutine(coro) and not isinstance(coro, _HostAware):
            coro = _HostAware(coro, loop)
        super().__init__(coro, loop=loop, name=name, context=context)
        if isinstance(coro, _HostAware):
            coro.task = self
        loop._tasks.add(self)

    def __hash__(self) -> int:
        return self._seq

    @property
    def path(self) -> str:
        """Position of the task in the task tree, e.g. ``"0.2.1"``."""
        return self._path

    def next_identity(self) -> str:
        """Return the identity of the next durable operation made by this task."""
        ident = f"{self._path}#{self._ops}"
        self._ops += 1
        return ident

    def child_path(self) -> str:
        """Return the path of the next task created by this task."""
        path = f"{self._path}.{self._children}"
        self._children += 1
        return path

    def volatile_child_path(self) -> str:
        """Return the path of the next task created by library code in this task.

        Such tasks are counted apart, so that however many a library makes the
        paths of the program's own tasks do not move.
        """
        path = f"{self._path}.~{self._volatile_children}"
        self._volatile_children += 1
        return path


class Timer(asyncio.TimerHandle):
    """A timer handle; durable when it has an identity.

    ``deadline`` is when it is due on the clock: its durable time for a durable
    timer, and for a volatile one the clock time at which its delay runs out
    (library timeouts are I/O timeouts: they count real seconds, on replay too).
    """

    __slots__ = ("deadline", "fired", "identity", "seq")

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: DurableLoop,
        context: contextvars.Context | None,
        identity: str | None,
        seq: int,
        deadline: float,
    ) -> None:
        super().__init__(when, callback, args, loop, context)
        self.identity = identity
        self.seq = seq
        self.deadline = deadline
        self.fired = False

    @property
    def dead(self) -> bool:
        """Whether the timer was cancelled or already fired."""
        return bool(self._cancelled) or self.fired


def _forward(name: str, *, adopt: str | None = None) -> Any:
    """Make a DurableLoop method that runs the host loop's coroutine method ``name``.

    ``adopt`` names the DurableLoop method that takes over what the host hands
    back (a transport, a server) so that it can be used from the durable loop.
    """

    async def method(self: DurableLoop, *args: Any, **kwargs: Any) -> Any:
        result = await self._bridge(getattr(self._host, name)(*args, **kwargs))
        if adopt is not None:
            getattr(self, adopt)(result)
        return result

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Run the host loop's ``{name}()`` and return its result here."
    return method


def _released(resource: asyncio.BaseTransport | asyncio.AbstractServer) -> bool:
    """Whether a transport is closing, or a server closed."""
    if isinstance(resource, asyncio.BaseTransport):
        return resource.is_closing()
    return not resource.sockets  # type: ignore[attr-defined]


class DurableLoop(asyncio.AbstractEventLoop):
    """An event loop stepped by its owner; see the module docstring.

    Args:
        host: The event loop that serves the endpoint; I/O is forwarded to it.
        clock: Source of wall-clock time while the run is live.
        start_time: Durable time (unix seconds) at which the run started.
        monotonic_offset: Unix time minus monotonic time when the run started;
            ``time()`` is durable time minus it (see ``time()``).
        hash_seed: A random number of the run (its seed), which sets the high bits of
            the hashes of the loop's tasks and futures; by default, a new one.
    """

    def __init__(
        self,
        host: asyncio.AbstractEventLoop,
        clock: Clock,
        start_time: float,
        monotonic_offset: float = 0.0,
        hash_seed: int | None = None,
    ) -> None:
        self._host = host
        self._clock = clock
        self._offset = monotonic_offset
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._durable_timers: dict[str, Timer] = {}
        self._seq = 0
        # Hashes of this loop's tasks and futures: a creation number (so that sets of
        # them iterate alike on replay) plus a random base in high bits (so that the
        # tasks of many live runs do not collide in asyncio's process-wide task set).
        # Set slots and early probes depend only on the low bits, hence not on the base.
        if hash_seed is None:
            hash_seed = int.from_bytes(os.urandom(2), "big")
        self._hash_base = hash_seed % _HASH_BASES << _HASH_SHIFT
        self._tasks: weakref.WeakSet[DurableTask[Any]] = weakref.WeakSet()
        # Made when the run first iterates an async generator: most never do, and a
        # WeakSet costs more to make than a trivial function takes to run.
        self._asyncgens: weakref.WeakSet[AsyncGenerator[Any, Any]] | None = None
        self._orphans = 0
        self._io_tasks = 0
        # Top-level packages whose code is the program's even when installed
        # (the package of the function being run); set by the owner.
        self.program_packages: frozenset[str] = frozenset()
        self._module_kinds: dict[str, str] = {}
        self._step_frame: types.FrameType | None = None
        self._stepping = False
        self._closed = False
        self._debug = False
        self._exception_handler: Callable[..., object] | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        # Threads the function started (pruned once ended), and executor workers,
        # which are not its own.
        self._threads: set[threading.Thread] = set()
        self._executor_threads: set[threading.Thread] = set()
        # Forwarded operations whose results were delivered here, and results held
        # back by a replay until its next epoch (see set_completion_limit()).
        self.completed = 0
        self._completion_limit: int | None = None
        self._held: collections.deque[tuple[asyncio.Future[Any], asyncio.Future[Any]]] = (
            collections.deque()
        )
        # Transports and servers opened from this loop: data may still arrive while
        # they are open.
        self._resources: set[asyncio.BaseTransport | asyncio.AbstractServer] = set()
        self._wake: asyncio.Event | None = None
        # Replaying: time() is the time of the epoch being replayed.
        self.replaying = False
        # Durable time: the time of the last journaled point, advanced by the wall clock
        # only while I/O is in flight (see time()).
        self._epoch_time = start_time
        self._io_elapsed = 0.0
        self._io_since: float | None = None
        # Tasks of a parked run, kept until it is discarded (see park()).
        self._parked_tasks: list[DurableTask[Any]] = []
        self.parked = self.discarded = False
        self._owner: weakref.ref[Any] | None = None

    # -- owner interface -------------------------------------------------------

    @property
    def owner(self) -> Any:
        """The run this loop runs: set by it, read by code inside it (see _context.py).

        Held weakly: the run holds its loop, and a cycle between them would leave every
        finished run to the garbage collector rather than free it at once.
        """
        return None if self._owner is None else self._owner()

    @owner.setter
    def owner(self, run: Any) -> None:
        self._owner = weakref.ref(run)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._hash_base + self._seq

    def set_epoch_time(self, when: float) -> None:
        """Set the durable time of the epoch being applied."""
        self._epoch_time = when
        self._io_elapsed = 0.0
        self._io_since = self._clock.time() if self.io_inflight else None

    def _io_changed(self) -> None:
        """Start or stop the clock of I/O time when I/O starts or stops being in flight."""
        active = bool(self._inflight or self._held or self._resources)
        if active and self._io_since is None:
            self._io_since = self._clock.time()
        elif not active and self._io_since is not None:
            self._io_elapsed += max(0.0, self._clock.time() - self._io_since)
            self._io_since = None

    def create_root_task(self, coro: Coroutine[Any, Any, _T]) -> DurableTask[_T]:
        """Create the task that runs the function itself (path ``"0"``)."""
        return DurableTask(coro, loop=self, path="0")

    def tasks(self) -> list[DurableTask[Any]]:
        """Return the tasks of this loop, in creation order."""
        return sorted(self._tasks, key=lambda t: t._seq)

    @property
    def io_inflight(self) -> int:
        """Number of forwarded I/O operations not delivered yet, and transports open."""
        return len(self._inflight) + len(self._held) + len(self._resources)

    @property
    def io_running(self) -> int:
        """Number of forwarded I/O operations running on the host loop, and transports open."""
        return len(self._inflight) + len(self._resources)

    @property
    def operations_inflight(self) -> int:
        """Number of forwarded I/O operations running (DNS, connects, executors...)."""
        return len(self._inflight)

    def step(self) -> None:
        """Run ready callbacks, in order, until none are left."""
        ready = self._ready
        if not ready:
            return
        host, hidden = _install(self)
        # Async generators first iterated here are finalized here, not on the host loop.
        hooks = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(firstiter=self._first_iter, finalizer=self._finalize_asyncgen)
        self._stepping = True
        self._step_frame = sys._getframe()
        threads = threading.enumerate()
        try:
            while ready:
                handle = ready.popleft()
                if handle._cancelled:
                    continue
                started = time.monotonic()
                handle._run()
                elapsed = time.monotonic() - started
                if elapsed > _SLOW_CALLBACK:
                    logger.warning(
                        "a durable function blocked the event loop for %.1f s in %r; "
                        "use asyncio.to_thread() for blocking work",
                        elapsed,
                        handle,
                    )
        finally:
            self._stepping = False
            self._step_frame = None
            sys.set_asyncgen_hooks(*hooks)
            _uninstall(host, hidden)
        # Compared as lists, not counts: a thread that ended during the step would
        # hide one the function started.
        after = threading.enumerate()
        if after != threads:
            self._adopt_threads(threads, after)

    def _adopt_threads(self, before: list[threading.Thread], after: list[threading.Thread]) -> None:
        # Threads the function started may hand values back with
        # call_soon_threadsafe(): while one runs, the run waits for it as for I/O.
        known = set(before)
        known.update(self._executor_threads)
        self._threads.update(t for t in after if t not in known)

    @property
    def threads_alive(self) -> int:
        """Number of threads started by the function (not executor workers) still running."""
        for thread in [t for t in self._threads if not t.is_alive()]:
            self._threads.discard(thread)
        return len(self._threads)

    def _first_iter(self, agen: AsyncGenerator[Any, Any]) -> None:
        if self._asyncgens is None:
            self._asyncgens = weakref.WeakSet()
        self._asyncgens.add(agen)

    def _finalize_asyncgen(self, agen: AsyncGenerator[Any, Any]) -> None:
        # Called when an unfinished async generator is garbage collected.
        if self._asyncgens is not None:
            self._asyncgens.discard(agen)
        if not self._closed:
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    def next_timer(self, *, durable: bool | None = None) -> Timer | None:
        """Return the pending timer due first (only durable or volatile ones if asked)."""
        self._prune_timers()
        if durable is None:
            return self._timers[0][2] if self._timers else None
        best: Timer | None = None
        for _, _, timer in self._timers:
            if timer.dead or (timer.identity is not None) != durable:
                continue
            if best is None or (timer.deadline, timer.seq) < (best.deadline, best.seq):
                best = timer
        return best

    def due_timers(self, now: float, *, durable: bool = True) -> list[Timer]:
        """Remove and return the timers due at clock time ``now``, in firing order.

        Durable timers are left in place unless ``durable`` is true.
        """
        due = []
        kept = []
        while self._timers:
            deadline, _, timer = self._timers[0]
            if timer.dead:
                heapq.heappop(self._timers)
                continue
            if deadline > now:
                break
            entry = heapq.heappop(self._timers)
            if timer.identity is not None and not durable:
                kept.append(entry)
            else:
                due.append(timer)
        for entry in kept:
            heapq.heappush(self._timers, entry)
        return due

    @property
    def volatile_timers(self) -> bool:
        """Whether a volatile timer (made by library code or a callback) will fire."""
        timer = self.next_timer(durable=False)
        return timer is not None and math.isfinite(timer.deadline)

    def durable_timer(self, identity: str) -> Timer | None:
        """Return the pending durable timer with this identity, if any."""
        timer = self._durable_timers.get(identity)
        if timer is None or timer.dead:
            return None
        return timer

    def fire(self, timer: Timer) -> None:
        """Schedule a timer's callback now; its heap entry is pruned lazily."""
        timer.fired = True
        if timer.identity is not None:
            self._durable_timers.pop(timer.identity, None)
        if not timer._cancelled:
            self._ready.append(timer)

    async def wait(self, deadline: float | None) -> None:
        """Wait on the host loop until woken by I/O or until ``deadline`` (clock time)."""
        if self._ready:
            return
        closing = [r for r in self._resources if _released(r)]
        if closing:
            # connection_lost() runs on the host loop's next iterations.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self._resources.difference_update(closing)
            self._io_changed()
            return
        if deadline is not None and not math.isfinite(deadline):
            deadline = None  # a timer that never fires
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.clear()
        idle = not self.io_inflight and not self.threads_alive
        if self._resources and not self._inflight:
            # A transport closing may schedule nothing here: look again soon.
            soon = self._clock.time() + 1.0
            deadline = soon if deadline is None else min(deadline, soon)
        if self.threads_alive:
            # A thread that ends schedules nothing here: look again soon.
            soon = self._clock.time() + _THREAD_POLL
            deadline = soon if deadline is None else min(deadline, soon)
        await self._clock.wait(self._wake, deadline, idle=idle)

    async def linger(self) -> bool:
        """Give the host loop a moment to deliver late I/O callbacks (a TLS shutdown, say).

        Returns:
            Whether a callback became ready.
        """
        for _ in range(_LINGER_STEPS):
            if self._ready:
                return True
            await asyncio.sleep(_LINGER_STEP)
        return bool(self._ready)

    def _prune_timers(self) -> None:
        while self._timers and self._timers[0][2].dead:
            heapq.heappop(self._timers)

    def _notify(self) -> None:
        if not self._stepping and self._wake is not None:
            self._wake.set()

    async def teardown(self) -> None:
        """Cancel every task and forwarded operation, and close the loop."""
        for fut in list(self._inflight):
            fut.cancel()
        self._held.clear()
        for resource in self._resources:
            resource.close()
        # Not asyncio.all_tasks(): it scans the tasks of every loop in the process.
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await self.shutdown_asyncgens()
        # Let cancelled tasks run their cleanup; bounded so a stubborn task cannot hang us.
        for _ in range(100):
            self.step()
            if not self._ready and not self._inflight:
                break
            if self._inflight and not self._ready:
                await self.wait(self._clock.time() + 1.0)
        self._timers.clear()
        self._durable_timers.clear()
        self._closed = True

    def park(self) -> None:
        """Let go of a run that has not ended, without running any of its code.

        Cancelling its tasks would run the function's ``finally:`` and ``except
        CancelledError:`` blocks now, and again at the real end of the function
        (in whichever run replays it there). So its forwarded operations are
        cancelled on the host loop, its transports and servers closed, its timers
        and ready callbacks dropped, and the loop closed: nothing is scheduled on
        it any more. Its tasks are kept, suspended, until discard(): Python
        would otherwise finalize them at some garbage collection, inside any
        other run, running those blocks there.
        """
        for fut in list(self._inflight):
            fut.cancel()
        self._inflight.clear()
        self._held.clear()
        for resource in self._resources:
            resource.close()
        self._resources.clear()
        self._io_changed()
        self._ready.clear()
        self._timers.clear()
        self._durable_timers.clear()
        self._parked_tasks = [t for t in self._tasks if not t.done()]
        self._closed = self.parked = True

    def discard(self) -> None:
        """Release the tasks of a parked run (when the runner closes, or many are parked).

        Their coroutines are closed here, at a known point, with this loop
        installed as the running loop: ``finally:`` blocks run then (with
        GeneratorExit, not CancelledError), and any durable call, task, or I/O
        they start ends them at once instead of reaching another run.
        """
        self.discarded = True
        tasks, self._parked_tasks = self._parked_tasks, []
        host, hidden = _install(self)
        try:
            for task in tasks:
                task._log_destroy_pending = False  # type: ignore[attr-defined]
                try:
                    task.get_coro().close()
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    pass  # what its finally blocks raised: nobody is there to see it
        finally:
            _uninstall(host, hidden)
        self._ready.clear()

    # -- scheduling ------------------------------------------------------------

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        """Schedule a callback; FIFO order is what makes the loop deterministic."""
        handle = asyncio.Handle(callback, args, self, context)
        if not self._closed:
            self._ready.append(handle)
            self._notify()
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        """Schedule a callback from another thread."""
        handle = asyncio.Handle(callback, args, self, context)
        if self._closed:
            return handle
        self._ready.append(handle)
        if self._wake is not None:
            self._host.call_soon_threadsafe(self._wake.set)
        return handle

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule a callback after ``delay`` seconds of durable time."""
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule a callback at durable time ``when``; durable when the program made it.

        See the module docstring for which timers are durable.
        """
        task = asyncio.current_task(self) if self._stepping else None
        identity = None
        if isinstance(task, DurableTask) and self._program_decides():
            identity = task.next_identity()
        seq = self._next_seq()
        # A durable timer is due at its durable time (unix seconds on the clock), a
        # volatile one counts real seconds from now (see Timer).
        if identity is not None:
            deadline = when + self._offset
        else:
            deadline = self._clock.time() + max(0.0, when - self.time())
        timer = Timer(when, callback, args, self, context, identity, seq, deadline)
        heapq.heappush(self._timers, (deadline, seq, timer))
        if identity is not None:
            self._durable_timers[identity] = timer
        return timer

    def _program_decides(self) -> bool:
        """Whether the code that asks for a timer or a task is the program's own.

        The innermost frame that is neither the standard library (asyncio's
        helpers, contextlib...) nor dispatch_aio decides: a third-party package
        (installed in site-packages) is library code, anything else is the
        program, and so is the package of the function being run wherever it is
        installed. Only frames of the running step are looked at.
        """
        frame: types.FrameType | None = sys._getframe(2)
        stop = self._step_frame
        kinds = self._module_kinds
        while frame is not None and frame is not stop:
            module = frame.f_globals.get("__name__", "")
            kind = kinds.get(module)
            if kind is None:
                kind = kinds[module] = self._module_kind(module, frame.f_code.co_filename)
            if kind != _TRANSPARENT:
                return kind == _PROGRAM
            frame = frame.f_back
        return True

    def is_program_frame(self, frame: types.FrameType) -> bool:
        """Whether a frame runs the program's own code (see `_program_decides`)."""
        module = frame.f_globals.get("__name__", "")
        kind = self._module_kinds.get(module)
        if kind is None:
            kind = self._module_kinds[module] = self._module_kind(module, frame.f_code.co_filename)
        return kind == _PROGRAM

    def _module_kind(self, module: str, filename: str) -> str:
        top = module.partition(".")[0]
        if top in self.program_packages:
            return _PROGRAM
        if top == _PACKAGE or top in sys.stdlib_module_names:
            return _TRANSPARENT
        parts = filename.replace("\\", "/").split("/")
        if "site-packages" in parts or "dist-packages" in parts:
            return _LIBRARY
        return _PROGRAM

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        # Cancelled timers are pruned lazily from the heap.
        identity = getattr(handle, "identity", None)
        if identity is not None:
            self._durable_timers.pop(identity, None)

    def time(self) -> float:
        """Durable time, in seconds on the scale of ``time.monotonic()``.

        It is the time of the last journaled point (the start, a delivered result, a
        fired timer), the same live and on replay, so code that reads it replays
        identically; while I/O is in flight it also moves with the wall clock, so
        that I/O timeouts work (time read then depends on how long the I/O took).

        As on asyncio's default loop, it starts out equal to ``time.monotonic()``,
        so that ``asyncio.timeout_at(time.monotonic() + 30)`` works; the offset is
        journaled, so it replays identically in any process. Deadlines computed
        from ``time.monotonic()`` are only right on the machine (and boot) that
        started the run: compute them from ``loop.time()``. ``dispatch_aio.now()``
        is the durable wall-clock time.
        """
        return self.unix_time() - self._offset

    def unix_time(self) -> float:
        """Durable time in unix seconds (what ``dispatch_aio.now()`` returns)."""
        elapsed = self._io_elapsed
        if self._io_since is not None:
            elapsed += max(0.0, self._clock.time() - self._io_since)
        return self._epoch_time + elapsed

    def create_future(self) -> asyncio.Future[Any]:
        """Create a future attached to this loop."""
        return DurableFuture(loop=self)

    def create_task(
        self,
        coro: Coroutine[Any, Any, _T] | Generator[Any, None, _T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[_T]:
        """Create a task whose path follows from the program position that creates it.

        See the module docstring for which tasks take a durable path.
        """
        if self.discarded:
            # A finally block of a discarded run: it must not start anything.
            if asyncio.iscoroutine(coro):
                coro.close()
            raise GeneratorExit
        program = self._stepping and self._program_decides()
        parent = asyncio.current_task(self) if self._stepping else None
        if isinstance(parent, DurableTask):
            path = parent.child_path() if program else parent.volatile_child_path()
        elif program:
            # Made by the program from a callback: callbacks run in order.
            self._orphans += 1
            path = f"cb{self._orphans}"
        else:
            # Made on the host loop by I/O (a server's connection handler, say).
            self._io_tasks += 1
            path = f"~io{self._io_tasks}"
        task = DurableTask(coro, loop=self, path=path, name=name, context=context)  # type: ignore[arg-type]
        task.volatile = not program
        return task

    # -- I/O forwarded to the host loop ----------------------------------------

    def _bridge(self, awaitable: Awaitable[_T]) -> asyncio.Future[_T]:
        """Run ``awaitable`` on the host loop; return a future of this loop for its result."""
        if self.discarded:
            # A finally block of a discarded run: it must not start anything.
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise GeneratorExit
        host_future = asyncio.ensure_future(awaitable, loop=self._host)
        future: asyncio.Future[_T] = _BridgedFuture(loop=self, host=host_future)
        self._inflight.add(host_future)
        self._io_changed()

        def transfer(done: asyncio.Future[_T]) -> None:
            self._inflight.discard(done)
            # Wake the owner even when the durable side gave up (a timeout cancelled
            # it): one less operation in flight may be what it waits for.
            self._notify()
            if future.done():
                self._io_changed()
                return
            if self._completion_limit is not None and self.completed >= self._completion_limit:
                self._held.append((done, future))  # see set_completion_limit()
                return
            self._deliver(done, future)

        host_future.add_done_callback(transfer)
        return future

    def _deliver(self, done: asyncio.Future[Any], future: asyncio.Future[Any]) -> None:
        """Hand the result of a forwarded operation to the future that waits for it here."""
        self.completed += 1
        self._io_changed()
        if future.done():
            return
        if done.cancelled():
            asyncio.Future.cancel(future)
        elif (exc := done.exception()) is not None:
            future.set_exception(exc)
        else:
            future.set_result(done.result())

    def set_completion_limit(self, limit: int | None) -> None:
        """Deliver results of forwarded operations only until ``completed`` reaches ``limit``.

        A replay sets it to the count recorded with the epoch it is about to
        apply, so that the epoch's events land at the same place among I/O
        completions as they did live; results beyond it wait. None: no limit.
        """
        self._completion_limit = limit
        while self._held and (limit is None or self.completed < limit):
            self._deliver(*self._held.popleft())

    async def run_on_host(self, awaitable: Awaitable[_T]) -> _T:
        """Await ``awaitable`` on the host loop and return its result here."""
        return await self._bridge(awaitable)

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., _T], *args: Any
    ) -> asyncio.Future[_T]:
        """Run ``func`` in an executor of the host loop."""
        before = set(threading.enumerate())
        future = self._host.run_in_executor(executor, func, *args)
        # A worker the executor started now is the executor's thread, not the function's.
        self._executor_threads.update(t for t in threading.enumerate() if t not in before)
        return self._bridge(future)

    def set_default_executor(self, executor: Any) -> None:
        """Refuse: the executor belongs to the host loop."""
        raise RuntimeError(
            "set the default executor on the host event loop, not in a durable function"
        )

    # Each coroutine method of the event-loop API that does I/O runs on the host loop;
    # the ones that open a transport keep the run live until it closes.
    getaddrinfo = _forward("getaddrinfo")
    getnameinfo = _forward("getnameinfo")
    create_connection = _forward("create_connection", adopt="_adopt_transport")
    create_unix_connection = _forward("create_unix_connection", adopt="_adopt_transport")
    create_datagram_endpoint = _forward("create_datagram_endpoint", adopt="_adopt_transport")
    create_server = _forward("create_server", adopt="_adopt_server")
    create_unix_server = _forward("create_unix_server", adopt="_adopt_server")
    connect_accepted_socket = _forward("connect_accepted_socket", adopt="_adopt_transport")
    sendfile = _forward("sendfile")
    sock_recv = _forward("sock_recv")
    sock_recv_into = _forward("sock_recv_into")
    sock_recvfrom = _forward("sock_recvfrom")
    sock_recvfrom_into = _forward("sock_recvfrom_into")
    sock_sendall = _forward("sock_sendall")
    sock_sendto = _forward("sock_sendto")
    sock_connect = _forward("sock_connect")
    sock_accept = _forward("sock_accept")
    sock_sendfile = _forward("sock_sendfile")
    subprocess_exec = _forward("subprocess_exec", adopt="_adopt_subprocess")
    subprocess_shell = _forward("subprocess_shell", adopt="_adopt_subprocess")
    connect_read_pipe = _forward("connect_read_pipe", adopt="_adopt_transport")
    connect_write_pipe = _forward("connect_write_pipe", adopt="_adopt_transport")

    def _adopt_transport(self, pair: tuple[asyncio.BaseTransport, Any]) -> None:
        # Data may arrive while the transport is open: the run stays live.
        self._resources.add(pair[0])
        self._io_changed()

    def _adopt_subprocess(self, pair: tuple[asyncio.SubprocessTransport, Any]) -> None:
        # asyncio.subprocess.Process.wait() (and so communicate()) awaits the
        # transport's _wait(), a future of the loop that made the transport.
        self._run_waits_on_host(pair[0], "_wait")
        self._adopt_transport(pair)

    def _adopt_server(self, server: asyncio.AbstractServer) -> None:
        # Connections may arrive while the server is open: the run stays live.
        self._run_waits_on_host(server, "serve_forever", "wait_closed")
        self._resources.add(server)
        self._io_changed()

    def _run_waits_on_host(self, obj: object, *names: str) -> None:
        """Make coroutine methods of a host-loop object awaitable from this loop.

        Called from a durable task, each runs on the host loop and its result is
        handed over here; called on the host loop (the object's own code calls
        it too), it runs there as it always did.
        """
        for name in names:
            method = getattr(obj, name)

            def call(
                *args: Any, _method: Callable[..., Awaitable[Any]] = method, **kwargs: Any
            ) -> Awaitable[Any]:
                if asyncio.events._get_running_loop() is not self:
                    return _method(*args, **kwargs)
                return self.run_on_host_call(_method, *args, **kwargs)

            setattr(obj, name, call)

    async def run_on_host_call(
        self, method: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any
    ) -> _T:
        """Call ``method`` on the host loop and return its result here."""
        return await self._bridge(method(*args, **kwargs))

    async def start_tls(self, *args: Any, **kwargs: Any) -> Any:
        """Upgrade a connection to TLS on the host loop."""
        transport = await self._bridge(self._host.start_tls(*args, **kwargs))
        if transport is not None:
            self._resources.add(transport)
            self._io_changed()
        return transport

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        """Watch a file descriptor for reading, on the host loop."""
        self._host.add_reader(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        """Stop watching a file descriptor for reading."""
        return self._host.remove_reader(fd)

    def add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        """Watch a file descriptor for writing, on the host loop."""
        self._host.add_writer(fd, callback, *args)

    def remove_writer(self, fd: Any) -> bool:
        """Stop watching a file descriptor for writing."""
        return self._host.remove_writer(fd)

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        """Refuse: signals belong to the host process."""
        raise RuntimeError("durable functions cannot install signal handlers")

    def remove_signal_handler(self, sig: int) -> bool:
        """Refuse: signals belong to the host process."""
        raise RuntimeError("durable functions cannot install signal handlers")

    # -- running and closing ---------------------------------------------------

    def run_forever(self) -> None:
        """Refuse: the loop is stepped by dispatch_aio."""
        raise RuntimeError("a DurableLoop is stepped by dispatch_aio and cannot be run directly")

    def run_until_complete(self, future: Any) -> Any:
        """Refuse: the loop is stepped by dispatch_aio."""
        raise RuntimeError("a DurableLoop is stepped by dispatch_aio and cannot be run directly")

    def stop(self) -> None:
        """Refuse: the loop is stepped by dispatch_aio."""
        raise RuntimeError("a DurableLoop cannot be stopped from inside a durable function")

    def is_running(self) -> bool:
        """Whether the loop is executing callbacks right now."""
        return self._stepping

    def is_closed(self) -> bool:
        """Whether the loop was torn down."""
        return self._closed

    def close(self) -> None:
        """Mark the loop closed (teardown() is the full shutdown)."""
        self._closed = True

    async def shutdown_asyncgens(self) -> None:
        """Close, on this loop, the async generators of the run that are still open."""
        agens, self._asyncgens = self._asyncgens, None
        for agen in list(agens or ()):
            self.create_task(agen.aclose())

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Nothing to do: the executor belongs to the host loop."""

    # -- errors and debug ------------------------------------------------------

    def set_exception_handler(self, handler: Callable[..., object] | None) -> None:
        """Set the handler of errors raised by callbacks."""
        self._exception_handler = handler

    def get_exception_handler(self) -> Callable[..., object] | None:
        """Return the handler of errors raised by callbacks."""
        return self._exception_handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        """Log an error raised by a callback."""
        message = context.get("message", "unhandled exception in a durable function")
        exc = context.get("exception")
        if self.replaying or self.parked:
            return
        logger.error("%s: %r", message, context, exc_info=exc)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Report an error raised by a callback."""
        if self._exception_handler is None:
            self.default_exception_handler(context)
        else:
            self._exception_handler(self, context)

    def get_debug(self) -> bool:
        """Whether asyncio debug mode is on."""
        return self._debug

    def set_debug(self, enabled: bool) -> None:
        """Turn asyncio debug mode on or off."""
        self._debug = enabled

    def set_task_factory(self, factory: Any) -> None:
        """Refuse: tasks must be durable tasks."""
        raise RuntimeError("durable functions cannot replace the task factory")

    def get_task_factory(self) -> None:
        """Return None: tasks are always durable tasks."""
        return None
