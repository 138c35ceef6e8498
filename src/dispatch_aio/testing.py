"""Test durable functions in process: fast, on virtual time, with replay checking.

`Environment` is a small scheduler that runs a `Dispatch`'s functions with the
full Poll semantics and no HTTP::

    from dispatch_aio.testing import Environment

    async def test_total() -> None:
        async with Environment(dispatch) as env:
            assert await env.call(total, 10) == 90

Time is virtual: durable sleeps and timeouts of hours complete at once, with
``loop.time()`` and ``dispatch_aio.now()`` moving as if they had passed.

A function's policies (``retry``, ``timeout``, ``expiration``, ``concurrency``,
``rate_limit``) apply as the scheduler applies them, on the environment's clock. An
attempt that outlives the function's ``timeout`` is a TIMEOUT answer, retried as its
``retry`` says; a sleep inside the attempt counts (in a ``replay="process"`` worker
too), while work the event loop cannot see (a plain ``def`` in a thread or a process)
takes no virtual time: with ``virtual_time=False`` it counts in real time.

Replay checking proves that a function is deterministic. ``replay="always"``
turns the live cache off, so every round replays the function from its
journal; ``shuffle=True`` delivers concurrent results in random order and
``split=True`` splits them over several rounds. A divergence fails the call
with `errors.NondeterminismError` and the engine's report (both sides and the
call site). `check_determinism` runs a call under several such settings and
seeds and checks that the results agree.

Replay in one process cannot show what a restart changes: there, a value pickled
by value comes back as the very class it was made of. ``replay="process"`` runs
every Run request of every call in a new Python process that knows nothing
but the request, as a scheduler that restarts the app before every resume would::

    async with Environment(dispatch, replay="process") as env:
        assert await env.call(total, 10) == 90

A value, error or journal then crosses a process boundary at every round: a class
rebuilt as a look-alike makes ``isinstance`` and ``except`` fail as they would in
production. What the mode needs and does:

- The new process imports the functions by reference: the module-level name
  of the `Dispatch` (or of each `Function`) in the module that defines them, on
  the parent's ``sys.path``. The parent's main script is loaded as
  ``__mp_main__`` and stands in for ``__main__``, as multiprocessing's spawn does,
  so keep the code that runs at start under ``if __name__ == "__main__":``.
  A function made inside a test, registered at run time, or defined in an
  interactive session fails the call with `WorkerError`, which says what to do.
- Stubs (`Environment.stub`) are closures of the test: they run in process.
- Virtual time: the worker's clock starts at the environment's time; the
  environment's clock stands still while workers run and then moves to where
  theirs ended. Results computed at the same virtual time are delivered together.
- The worker's log records are handled again by the test's loggers (``caplog``
  sees them); what it prints goes to stderr. A worker that crashes fails the call
  with `WorkerError` and the worker's stderr.
- On Linux a worker is forked from a server that has imported the SDK and
  nothing of the program (see `WorkerPool`): milliseconds of CPU, where a new
  interpreter costs a few tenths of a second. A `WorkerPool` also keeps spare
  workers started ahead; pass one pool to many environments (``workers=``) to
  share them. Under pytest the ``dispatch_workers`` fixture is
  the session's pool, and ``pytest --dispatch-replay=process`` runs the
  ``dispatch_env`` environments of a whole suite this way.

Like the local scheduler, the environment uses the journal extension with the
live cache (``replay="cached"``): a Poll carries only the journal's new segment,
which the environment keeps, and a resume names the journal by reference; the
whole journal goes only when the run is not live any more. So ``responses`` and
``requests`` hold ``JournalDelta`` and ``JournalRef`` states there; pass
``journal="whole"`` for the plain protocol, where every state is the whole
journal.

`Environment.stub` replaces a function with a fake for one test, `Environment.calls`
shows every call made (inputs, outputs, errors, attempts), and
`check_journals` replays journals recorded earlier against the current code.
Environments cancel what they still run when closed (``async with``, or `aclose`),
so calls left in flight never leak into the next test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import math
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Literal, ParamSpec, Self, TypeVar

from google.protobuf import any_pb2, timestamp_pb2

from . import _codec
from ._client import Call
from ._dispatch import Dispatch
from ._endpoint import DEFAULT_MAX_SIGNED_BODY_SIZE, body_too_large
from ._function import Function
from ._policy import FunctionPolicy, RateLimit
from ._replay_worker import Setup, Target, WorkerError, WorkerPool, locate, module_file
from ._reserved import WAIT_EVENT
from ._status import Classifier, Status
from ._testing_events import EventBoard, ScheduleBoard
from .durable import Clock, Runner
from .durable._journal import (
    JOURNAL_DELTA_TYPE_URL,
    JOURNAL_NEEDED,
    JOURNAL_REF_TYPE_URL,
    pack_state,
)
from .durable._runner import Detection, DivergencePolicy
from .errors import NondeterminismError
from .proto.sdk.v1 import call_pb2, error_pb2, function_pb2, poll_pb2, status_pb2
from .proto.v1 import journal_pb2
from .scheduler._engine import DEFAULT_EXPIRATION

# The scheduler's longest backoff between two attempts (RetryPolicy.max_backoff).
_MAX_RETRY_DELAY = 30.0

__all__ = [
    "CallInfo",
    "Environment",
    "JournalReport",
    "VirtualClock",
    "WorkerError",
    "WorkerPool",
    "check_determinism",
    "check_journals",
]

P = ParamSpec("P")
R = TypeVar("R")

Replay = Literal["cached", "always", "process"]
_MAIN_NAMES = ("__main__", "__mp_main__")
# Per poller: children still running by correlation id, and results not yet delivered.
_Poller = tuple[dict[int, "asyncio.Future[call_pb2.CallResult]"], list[call_pb2.CallResult]]
_Target = Dispatch | Iterable[Function[Any, Any]]


class _Limits:
    """The concurrency and rate limits of functions' policies, on the environment's clock."""

    def __init__(self, clock: VirtualClock | _RealClock) -> None:
        self._clock = clock
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # function: (tokens, at)

    @contextlib.asynccontextmanager
    async def attempt(
        self, function: str, policy: FunctionPolicy | None, *, starting: bool
    ) -> AsyncIterator[None]:
        """Hold what one attempt of `function` needs: a rate token, a concurrency slot."""
        if policy is not None and policy.rate_limit is not None and starting:
            await self._token(function, policy.rate_limit)
        if policy is None or policy.concurrency is None:
            yield
            return
        slot = self._slots.get(function)
        if slot is None:
            slot = self._slots[function] = asyncio.Semaphore(policy.concurrency)
        async with slot:
            yield

    async def _token(self, function: str, rate: RateLimit) -> None:
        """Take a token of the function's bucket, waiting for one on the clock."""
        tokens, at = self._buckets.get(function, (float(rate.burst), self._clock.time()))
        while True:
            now = self._clock.time()
            tokens = min(float(rate.burst), tokens + (now - at) * rate.per_second)
            at = now
            if tokens >= 1.0:
                self._buckets[function] = (tokens - 1.0, at)
                return
            self._buckets[function] = (tokens, at)
            await self._clock.sleep_until(now + (1.0 - tokens) / rate.per_second)
            tokens, at = self._buckets[function]


class VirtualClock(Clock):
    """A clock that jumps to the next deadline as soon as nothing else can happen.

    It starts at the real time (or at ``start``). Whenever every waiter is
    waiting on time (and the event loop has had nothing else to do for a few
    iterations), it advances to the earliest deadline, so an hour-long sleep
    takes no time.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._jumper: asyncio.Task[None] | None = None
        self._holds = 0
        self._unheld: list[asyncio.Future[None]] = []

    def time(self) -> float:
        """Return the virtual time in unix seconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self._now += max(0.0, seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when``; never backwards."""
        self._now = max(self._now, when)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep time still while the block runs.

        For work the event loop cannot see, such as a request handed to
        another process: an idle loop does not mean that nothing can happen.
        """
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                waiters, self._unheld = self._unheld, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    async def _until_unheld(self) -> None:
        while self._holds:
            waiter = asyncio.get_running_loop().create_future()
            self._unheld.append(waiter)
            await waiter

    async def sleep_until(self, deadline: float) -> None:
        """Wait until the virtual time reaches ``deadline``."""
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (deadline, self._seq, future))
        if self._jumper is None or self._jumper.done():
            self._jumper = loop.create_task(self._jump(), name=_JUMPER)
        await future

    async def wait(self, wake: asyncio.Event, deadline: float | None, *, idle: bool) -> None:
        """Wait until ``wake`` is set or the time reaches ``deadline``."""
        sleeper = None if deadline is None else asyncio.ensure_future(self.sleep_until(deadline))
        waker = asyncio.ensure_future(wake.wait())
        waiters: list[asyncio.Future[Any]] = [waker] if sleeper is None else [sleeper, waker]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def aclose(self) -> None:
        """Cancel every sleeper and stop jumping; the clock can be used again afterwards."""
        sleepers, self._sleepers = self._sleepers, []
        for _, _, future in sleepers:
            future.cancel()
        jumper, self._jumper = self._jumper, None
        if jumper is not None and not jumper.done():
            jumper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await jumper

    async def _jump(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = 0
        while True:
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                return
            if self._holds:
                await self._until_unheld()  # without spinning: the held work needs the CPU
                quiet = 0
                continue
            await asyncio.sleep(0)
            # Jump only once the loop has had nothing to run for a few iterations:
            # whatever could still happen before the deadline has happened.
            quiet = 0 if _has_ready(loop) else quiet + 1
            if quiet < 3:
                continue
            quiet = 0
            deadline, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                self._now = max(self._now, deadline)
                future.set_result(None)


# Name of the tasks that move virtual clocks: they are no work of their own, so that
# two clocks on one loop do not each keep the other from ever seeing it idle.
_JUMPER = "dispatch_aio.testing.VirtualClock.jump"


def _has_ready(loop: asyncio.AbstractEventLoop) -> bool:
    # asyncio has no public way to ask whether callbacks are pending.
    for handle in getattr(loop, "_ready", ()):
        task = getattr(getattr(handle, "_callback", None), "__self__", None)
        if not (isinstance(task, asyncio.Task) and task.get_name() == _JUMPER):
            return True
    return False


class _RealClock(Clock):
    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - self.time()))


@dataclasses.dataclass(eq=False)
class CallInfo:
    """One call run by an `Environment`, with what became of it."""

    id: str
    """Dispatch id given to the call."""
    function: str
    """Function called (the last one, after tail calls)."""
    args: tuple[Any, ...]
    """Positional arguments of the call."""
    kwargs: dict[str, Any]
    """Keyword arguments of the call."""
    parent: CallInfo | None = None
    """The call that made this one, None for a call made by the test."""
    children: list[CallInfo] = dataclasses.field(default_factory=list)
    """Calls made by this one, in the order they were made."""
    attempts: int = 0
    """Number of retries after a temporary failure (0 for a call whose first attempt
    was final)."""
    rounds: int = 0
    """Number of Run requests sent for the call, resumes included."""
    tail_calls: list[str] = dataclasses.field(default_factory=list)
    """Functions the call was handed over to, in order."""
    status: Status | None = None
    """Final status; None while the call runs."""
    output: Any = None
    """Return value, when the call succeeded."""
    error: BaseException | None = None
    """Exception the call ended with, if any."""
    divergences: int = 0
    """Runs of the call that diverged from their journal (with
    ``on_divergence="restart"`` each restarted the call from its input)."""
    created_at: float = 0.0
    """Clock time at which the call was made."""
    expires_at: float = math.inf
    """Clock time at which the call expires (fails with ``DispatchTimeoutError``), as the
    scheduler expires calls; a child never outlives its parent."""


@dataclasses.dataclass(frozen=True)
class JournalReport:
    """The outcome of replaying one recorded journal against the current code."""

    name: str
    """Label of the journal (a file name, a dispatch id)."""
    function: str
    """Function the journal belongs to."""
    problem: str | None
    """Why the journal would not replay (a divergence report), or None if it would."""
    old_patches: tuple[str, ...] = ()
    """Patches (`dispatch_aio.patched`) whose old branch the journal's run takes: the
    code must keep those branches until the run has ended."""
    app_version: str = ""
    """Version of the application that recorded the journal, if it set one."""

    @property
    def ok(self) -> bool:
        """Whether the journal replays against the current code."""
        return self.problem is None


class Environment:
    """An in-process scheduler for tests; see the module docstring.

    Args:
        target: A `Dispatch`, or the functions to run.
        replay: ``"cached"`` keeps suspended runs live, as an endpoint does;
            ``"always"`` replays every round from the journal;
            ``"process"`` runs every Run request in a new Python process
            (see the module docstring).
        shuffle: Deliver the results of concurrent calls in random order.
        split: Deliver results over several rounds (between the Poll's
            ``min_results`` and ``max_results``).
        seed: Seed of the random choices of ``shuffle`` and ``split``.
        virtual_time: Run on a `VirtualClock`; False uses the real clock
            (needed when functions do real I/O with timeouts).
        max_attempts: Attempts in all (the first included) of a call that fails
            with a temporary status before its error is final, as the scheduler's
            ``--max-attempts``; 0 retries until the call expires. A function's own
            ``retry`` policy wins (its attempts, statuses and backoff).
        retry_delay: Seconds before the first retry; doubles at each retry, up to 30 s
            (the scheduler's longest backoff).
        expiration: Seconds after which a call that has not finished fails with
            `errors.DispatchTimeoutError` (a ``TimeoutError``), as the scheduler
            expires calls: 7 days, so a durable sleep of 8 days fails here as it does
            there. ``math.inf``: never. A call's own expiration, else its function's
            ``expiration`` policy, wins.
        workers: With ``replay="process"``, the `WorkerPool` to run requests
            in, to share its spare interpreters between environments; by
            default the environment starts a pool of its own and closes it.
        journal: ``"delta"`` uses the journal extension, as the local
            scheduler does (it takes effect with the live cache only);
            ``"whole"`` the plain protocol, where each Poll carries the whole
            journal and each resume echoes it.
        max_body_size: Largest Run request, in bytes, as the endpoint's limit on the
            requests of a scheduler that signs them (``Dispatch(max_signed_body_size=)``,
            1,000,000,000 bytes by default): a larger one fails the call with
            PERMANENT_ERROR and the endpoint's message. With ``replay="always"`` or
            ``"process"`` every resume carries the whole journal, as after an app
            restart, so a function whose results would not fit there fails in the
            test, not in production.
        on_divergence: ``"fail"`` (the default here) ends a call that diverges from
            its journal with `errors.NondeterminismError`; ``"restart"`` runs it
            again from its input, as a scheduler does for functions with that
            policy (counted in `CallInfo.divergences`).
        nondeterminism: What reading the wall clock (``time.time``,
            ``time.monotonic``, ``datetime.now``), the global ``random``,
            ``uuid.uuid4``, ``os.urandom`` or ``secrets`` directly inside a durable
            function does: ``"fail"`` (the default here) fails the call with
            `errors.NondeterminismError`, naming the line and what to use instead;
            ``"warn"`` logs it; ``"off"``. Only functions that suspend are held to
            it (a run that ends in its first round never replays), and only the
            program's own code: libraries, ``run_on_host`` and threads are not
            watched.
        perturb_time: With virtual time, shift the time the ``time`` module returns
            while a function runs, by an offset that grows with each round (a day,
            an hour, a minute and a second per round), so that code that branches
            on it takes another branch on replay; `check_determinism` turns it on.
    """

    def __init__(
        self,
        target: _Target,
        *,
        replay: Replay = "cached",
        shuffle: bool = False,
        split: bool = False,
        seed: int = 0,
        virtual_time: bool = True,
        max_attempts: int = 10,
        retry_delay: float = 1.0,
        expiration: float = DEFAULT_EXPIRATION,
        workers: WorkerPool | None = None,
        journal: Literal["delta", "whole"] = "delta",
        max_body_size: int = DEFAULT_MAX_SIGNED_BODY_SIZE,
        on_divergence: DivergencePolicy = "fail",
        nondeterminism: Detection = "fail",
        perturb_time: bool = False,
    ) -> None:
        self._max_body_size = max_body_size
        self._owner = target if isinstance(target, Dispatch) else None
        if isinstance(target, Dispatch):
            self._functions: Mapping[str, Function[Any, Any]] = target.functions
            classifier = target._classifier
        else:
            self._functions = {f.name: f for f in target}
            classifier = Classifier()
        self._stubs: dict[str, Callable[..., Awaitable[Any]]] = {}
        self._rejections: dict[str, list[str]] = {}
        self._shuffle = shuffle
        self._split = split
        self._rng = random.Random(seed)
        if max_attempts < 0:
            raise ValueError(f"max_attempts must be 0 (until expiry) or more, not {max_attempts}")
        if not expiration > 0:
            raise ValueError(f"expiration must be positive seconds, not {expiration!r}")
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay
        self._expiration = expiration
        self.clock: VirtualClock | _RealClock = VirtualClock() if virtual_time else _RealClock()
        self._on_divergence: DivergencePolicy = on_divergence
        # Perturbed time would move a real clock, which the runner itself reads.
        perturb_time = perturb_time and virtual_time
        self._runner_options: dict[str, str | bool] = {
            "on_divergence": on_divergence,
            "nondeterminism": nondeterminism,
            "perturb_time": perturb_time,
        }
        self._runner = Runner(
            self._lookup,
            classifier=classifier,
            cache_size=1024 if replay == "cached" else 0,
            clock=self.clock,
            on_divergence=on_divergence,
            nondeterminism=nondeterminism,
            perturb_time=perturb_time,
        )
        self._journal_delta = journal == "delta"
        # Journals kept for the calls (the journal extension): segments by call id.
        self._journals: dict[str, list[journal_pb2.JournalDelta]] = {}
        self._workers: WorkerPool | None = None
        self._own_workers = False
        if replay == "process":
            self._own_workers = workers is None
            self._workers = WorkerPool() if workers is None else workers
        self._targets: dict[str, Target] = {}
        self._calls: list[CallInfo] = []
        self._pollers: dict[str, _Poller] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._events = EventBoard(self.clock.sleep_until, self.clock.time)
        self._schedules = ScheduleBoard(self.clock.time)
        self._limits = _Limits(self.clock)
        self.requests: list[function_pb2.RunRequest] = []
        """Every Run request sent, in order."""
        self.responses: list[function_pb2.RunResponse] = []
        """Every Run response received, in order."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop calls still running and drop the live runs."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._runner.aclose()
        if self._own_workers and self._workers is not None:
            self._workers.close()
        if isinstance(self.clock, VirtualClock):
            await self.clock.aclose()
        # The runner cancels its cache sweeper without waiting for it: let it end here,
        # not in the next environment's time.
        await asyncio.sleep(0)

    # -- running calls ----------------------------------------------------------------

    async def call(self, fn: Function[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` and its call tree to completion; return its result.

        Raises:
            Exception: The error the call ended with (after retries).
            errors.NondeterminismError: The function diverged from its journal.
        """
        info = await self.run(fn, *args, **kwargs)
        if info.error is not None:
            raise info.error
        if info.status is not Status.OK:
            raise RuntimeError(f"call to {fn.name!r} ended with status {info.status}")
        return info.output  # type: ignore[no-any-return]

    async def run(self, fn: Function[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> CallInfo:
        """Like `call`, but return the `CallInfo` instead of raising the call's error."""
        input = _codec.encode_input(args, kwargs, function=fn.name)
        info = self._new_call(fn.name, input, None)
        await self._execute(info, fn.name, input)
        return info

    def stub(self, fn: Function[P, R], fake: Callable[P, Awaitable[R]]) -> None:
        """Run ``fake`` wherever ``fn`` is called, until `unstub`.

        The fake runs as a durable function: it may make calls, sleep and
        raise, e.g. `errors.ThrottledError` to have the call retried.
        """
        self._stubs[fn.name] = fake

    def unstub(self, fn: Function[Any, Any]) -> None:
        """Run the real function again."""
        self._stubs.pop(fn.name, None)

    def reject_calls(
        self, fn: Function[Any, Any], times: int = 1, message: str = "calls rejected"
    ) -> None:
        """Reject the calls of ``fn``'s next ``times`` Polls, as a scheduler may.

        Nothing is dispatched; the resume carries ``PollResult.error``, which
        the tasks that made the calls receive as `errors.RemoteError`.
        """
        self._rejections.setdefault(fn.name, []).extend([message] * times)

    def calls(self, fn: Function[Any, Any] | None = None) -> list[CallInfo]:
        """Return the calls made so far (only those to ``fn`` if given), in creation order."""
        return [c for c in self._calls if fn is None or c.function == fn.name]

    def time(self) -> float:
        """Return the environment's current time (virtual unless disabled)."""
        return self.clock.time()

    # -- durable events and schedules ------------------------------------------------------

    async def send_event(
        self, key: str, value: Any = None, *, error: BaseException | None = None
    ) -> int:
        """Resolve a durable event, as ``dispatch.client.send_event`` does.

        Calls waiting in ``dispatch_aio.wait_event(key)`` receive `value` (or have
        `error` raised); calls that wait on the key later get it at once. A wait
        that is not resolved within its timeout raises ``TimeoutError`` when the
        environment's clock gets there (at once on virtual time, if nothing else
        happens).

        Returns:
            The number of calls that were waiting on the key.

        Raises:
            errors.EventAlreadyResolvedError: The key was resolved already.
            ValueError: The key is invalid, or both a value and an error were given.
        """
        return self._events.send(key, value, error=error)

    async def until_waiting(self, key: str, count: int = 1) -> None:
        """Return once `count` calls (or more) wait on the event `key`.

        Use it before `send_event` to test what happens to a call that waits, rather
        than to one that finds the event resolved already.
        """
        await self._events.until_waiting(key, count)

    def schedule(
        self,
        call: Call | Function[[], Any],
        *,
        cron: str | None = None,
        time_zone: str = "UTC",
        every: float | None = None,
        missed: Literal["skip", "once", "all"] = "skip",
        id: str | None = None,
    ) -> str:
        """Add a schedule, as ``dispatch.client.schedules.create`` does; return its id.

        ::

            env.schedule(Call(report.name, ("sales",)), cron="0 2 * * *")
            fired = await env.run_for(24 * 3600)   # virtual time: at once

        Schedules fire only while `run_for` moves the clock.
        """
        if not isinstance(call, Call):
            call = Call(call.name)
        schedule_id = id or f"schedule-{call.function}-{len(self._calls)}"
        self._schedules.add(
            schedule_id, call.function, call._input, cron=cron, time_zone=time_zone,
            every=every, missed=missed,
        )  # fmt: skip
        return schedule_id

    def pause_schedule(self, schedule_id: str) -> None:
        """Stop a schedule's firings until `resume_schedule`."""
        self._schedules.set_paused(schedule_id, True)

    def resume_schedule(self, schedule_id: str) -> None:
        """Resume a paused schedule at its first firing after now."""
        self._schedules.set_paused(schedule_id, False)

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule."""
        self._schedules.remove(schedule_id)

    async def run_for(self, seconds: float) -> list[CallInfo]:
        """Move the clock `seconds` forward, making the firings of the schedules on the way.

        Each firing is a call made by the test; this returns once every call it fired
        has finished (which may move virtual time further), with those calls in firing
        order.
        """
        end = self.clock.time() + seconds
        fired: list[CallInfo] = []
        tasks: list[asyncio.Future[call_pb2.CallResult]] = []
        while True:
            upcoming = self._schedules.next_firing()
            target = end if upcoming is None or upcoming > end else upcoming
            await self.clock.sleep_until(target)
            for _, function, input, _ in self._schedules.due():
                info = self._new_call(function, input, None)
                task = asyncio.ensure_future(self._execute(info, function, input))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                tasks.append(task)
                fired.append(info)
            if target >= end:
                break
        await asyncio.gather(*tasks)
        return fired

    async def _answer_wait(self, info: CallInfo, call: call_pb2.Call) -> call_pb2.CallResult:
        """Answer a call to the reserved wait function, as dispatch_aio's scheduler does."""
        status, result = await self._events.wait(call)
        return self._finish(info, status, result)

    # -- the scheduler --------------------------------------------------------------------

    def _lookup(self, name: str) -> Callable[..., Awaitable[Any]] | None:
        stub = self._stubs.get(name)
        if stub is not None:
            return stub
        fn = self._functions.get(name)
        return None if fn is None else fn.fn

    def _new_call(
        self,
        function: str,
        input: any_pb2.Any,
        parent: CallInfo | None,
        call: call_pb2.Call | None = None,
    ) -> CallInfo:
        try:
            args, kwargs = _codec.decode_input(input)
        except _codec.DecodeError:
            args, kwargs = (input,), {}
        now = self.clock.time()
        info = CallInfo(str(len(self._calls) + 1), function, args, kwargs, parent, created_at=now)
        # As the scheduler: the call's own expiration, else its function's, else the default.
        seconds = self._expiration
        registered = self._functions.get(function)
        if call is not None and call.expiration.ToNanoseconds() > 0:
            seconds = call.expiration.ToNanoseconds() / 1e9
        elif registered is not None and registered.policy.expiration is not None:
            seconds = registered.policy.expiration
        info.expires_at = now + seconds
        if parent is not None:
            info.expires_at = min(info.expires_at, parent.expires_at)
        self._calls.append(info)
        if parent is not None:
            parent.children.append(info)
        return info

    def _first_request(
        self, info: CallInfo, function: str, input: any_pb2.Any
    ) -> function_pb2.RunRequest:
        root = info
        while root.parent is not None:
            root = root.parent
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(self.clock.time() * 1e9))
        return function_pb2.RunRequest(
            function=function,
            input=input,
            dispatch_id=info.id,
            parent_dispatch_id=info.parent.id if info.parent else "",
            root_dispatch_id=root.id,
            creation_time=created,
        )

    async def _execute(
        self, info: CallInfo, function: str, input: any_pb2.Any
    ) -> call_pb2.CallResult:
        request = self._first_request(info, function, input)
        delay = self._retry_delay
        restarts = 0
        while True:
            if self.clock.time() >= info.expires_at:
                return self._finish(info, Status.TIMEOUT, _expired(info))
            registered = self._functions.get(info.function)
            policy = registered.policy if registered is not None else None
            # As the scheduler: a first run or a retry takes a rate token; every attempt a
            # concurrency slot, held while its Run request is in flight.
            starting = request.WhichOneof("directive") == "input"
            async with self._limits.attempt(info.function, policy, starting=starting):
                with self._opaque(registered):
                    cut_at = policy.timeout if policy is not None else None
                    response = await self._attempt(info, request, cut_at)
            cut = None
            if response is None:  # cut at the function's timeout: a TIMEOUT answer
                cut = f"the attempt outlived the function's timeout of {cut_at:.6g} s"
                response = _timed_out(info, cut)
            if response.WhichOneof("directive") == "poll":
                request = await self._resume(info, request, response.poll)
                continue
            done = response.exit
            if done.HasField("tail_call"):
                info.tail_calls.append(done.tail_call.function)
                info.function = done.tail_call.function
                input = done.tail_call.input
                request = self._first_request(info, info.function, input)
                continue
            status = Status(response.status)
            if done.result.error.type == "NondeterminismError":
                info.divergences += 1
            if status is Status.INCOMPATIBLE_STATE:
                restarts += 1
                if self._on_divergence == "restart" and restarts < self._max_attempts:
                    # As a scheduler does: the call runs again from its input.
                    self._journals.pop(info.id, None)
                    request = self._first_request(info, info.function, input)
                    continue
                return self._finish(info, status, done.result, nondeterministic=True)
            # As the scheduler's --max-attempts (0 retries until the call expires), or
            # the function's own retry policy: attempts in all, the first included.
            retry = policy.retry if policy is not None else None
            if retry is not None:
                limit = retry.max_attempts
                retried = retry.retries(status)
            else:
                limit, retried = self._max_attempts, status.temporary
            if retried and (limit == 0 or info.attempts + 1 < limit):
                info.attempts += 1
                if retry is not None:
                    delay = retry.backoff(info.attempts, random.Random(info.attempts))
                await self.clock.sleep_until(min(self.clock.time() + delay, info.expires_at))
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                request = self._first_request(info, info.function, input)
                continue
            if retried and cut is not None:  # out of attempts: as the scheduler says it
                failure = f"gave up after {info.attempts + 1} failed attempts; the last one: {cut}"
                return self._finish(info, status, _timed_out(info, failure).exit.result)
            return self._finish(info, status, done.result)

    async def _attempt(
        self, info: CallInfo, request: function_pb2.RunRequest, cut_at: float | None
    ) -> function_pb2.RunResponse | None:
        """One attempt: its Run request, or None once it has taken `cut_at` seconds.

        Seconds of the environment's clock, as the scheduler counts a function's
        ``timeout``. As over HTTP, a run that outlives it goes on unobserved.
        """
        exchange = self._exchange(info, request)
        if cut_at is None:
            return await exchange
        started = self.clock.time()
        task = asyncio.ensure_future(exchange)
        sleeper = asyncio.ensure_future(self.clock.sleep_until(started + cut_at))
        try:
            await asyncio.wait((task, sleeper), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            sleeper.cancel()
        if not task.done():
            self._background.add(task)  # stopped when the environment closes
            task.add_done_callback(self._forget)
            return None
        response = task.result()
        # A worker process keeps time of its own: what it took shows once it answered.
        return response if self.clock.time() - started < cut_at else None

    def _forget(self, task: asyncio.Task[Any]) -> None:
        """Drop a run nobody waits for any more, and its error with it."""
        self._background.discard(task)
        if not task.cancelled():
            task.exception()

    async def _exchange(
        self, info: CallInfo, request: function_pb2.RunRequest
    ) -> function_pb2.RunResponse:
        """Send a Run request; again with the whole journal if the run is not live."""
        response = await self._send(info, request)
        if _journal_needed(response) and info.id in self._journals:
            whole = b"".join(d.segment for d in self._journals[info.id])
            request.poll_result.typed_coroutine_state.CopyFrom(pack_state(whole))
            response = await self._send(info, request)
        return response

    def _opaque(
        self, function: Function[Any, Any] | None
    ) -> contextlib.AbstractContextManager[None]:
        """Keep virtual time still while a plain ``def`` runs in a thread or a process.

        The loop cannot see that work: without this, an idle-looking loop would let the
        clock jump to the next deadline (the call's expiration) in the middle of it.
        """
        if function is not None and function.is_sync and isinstance(self.clock, VirtualClock):
            return self.clock.hold()
        return contextlib.nullcontext()

    def _finish(
        self,
        info: CallInfo,
        status: Status,
        result: call_pb2.CallResult,
        *,
        nondeterministic: bool = False,
    ) -> call_pb2.CallResult:
        self._journals.pop(info.id, None)
        info.status = status
        if result.HasField("error"):
            info.error = _codec.decode_error(result.error)
            if nondeterministic and not isinstance(info.error, NondeterminismError):
                info.error = NondeterminismError(result.error.message)
        elif status is not Status.OK:
            info.error = RuntimeError(f"call to {info.function!r} ended with status {status.name}")
        if result.HasField("output"):
            info.output = _codec.decode_value(result.output)
        if status is not Status.OK and not result.HasField("error"):
            # What a scheduler delivers to the parent of a call that failed without an error.
            synthesized = call_pb2.CallResult()
            synthesized.CopyFrom(result)
            synthesized.error.CopyFrom(error_pb2.Error(type=status.proto_name, message=status.name))
            return synthesized
        return result

    async def _send(
        self, info: CallInfo, request: function_pb2.RunRequest
    ) -> function_pb2.RunResponse:
        # Round trip through bytes, as over the wire.
        data = request.SerializeToString()
        request = function_pb2.RunRequest.FromString(data)
        self.requests.append(request)
        info.rounds += 1
        if len(data) > self._max_body_size:  # refused by the endpoint, as HTTP 413
            refusal = body_too_large(len(data), self._max_body_size)
            message = f"function {request.function!r}: HTTP 413 ({refusal})"
            error = error_pb2.Error(type=Status.PERMANENT_ERROR.proto_name, message=message)
            refused = function_pb2.RunResponse(status=status_pb2.STATUS_PERMANENT_ERROR)
            refused.exit.result.error.CopyFrom(error)
            self.responses.append(refused)
            return refused
        name = request.function
        if self._workers is not None and name in self._functions and name not in self._stubs:
            data = await self._run_in_worker(name, data)
        else:
            response = await self._runner.run(request, journal_delta=self._journal_delta)
            data = response.SerializeToString()
        response = function_pb2.RunResponse.FromString(data)
        self.responses.append(response)
        return response

    async def _run_in_worker(self, name: str, request: bytes) -> bytes:
        assert self._workers is not None
        modules = {getattr(f.fn, "__module__", None) for f in self._functions.values()}
        target = self._targets.get(name)
        if target is None:
            near = [m for m in modules if m is not None]
            target = self._targets[name] = locate(self._functions[name], self._owner, near)
        modules.add(target.module)
        setup = Setup.current(
            module_file(m) for m in sorted(m for m in modules if m and m not in _MAIN_NAMES)
        )
        options = self._runner_options
        if not isinstance(self.clock, VirtualClock):
            _, response = await self._workers.run(setup, target, None, request, options)
            return response
        # The worker's clock starts at ours; ours stands still meanwhile (the loop looks
        # idle while the worker runs) and then moves to where the worker's ended.
        with self.clock.hold():
            end, response = await self._workers.run(
                setup, target, self.clock.time(), request, options
            )
        if end is not None:
            self.clock.advance_to(end)
        return response

    async def _resume(
        self, info: CallInfo, request: function_pb2.RunRequest, poll: poll_pb2.Poll
    ) -> function_pb2.RunRequest:
        running, queue = self._children(info)
        rejections = self._rejections.get(info.function)
        if poll.calls and rejections:
            return self._resume_request(
                info, request, poll, [], error_pb2.Error(type="Rejected", message=rejections.pop(0))
            )
        for call in poll.calls:
            child = self._new_call(call.function, call.input, info, call)
            if call.function == WAIT_EVENT:
                task = asyncio.ensure_future(self._answer_wait(child, call))
            else:
                task = asyncio.ensure_future(self._execute(child, call.function, call.input))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            running[call.correlation_id] = task
        deadline = None
        if poll.HasField("max_wait"):
            deadline = self.clock.time() + poll.max_wait.ToTimedelta().total_seconds()
        if info.expires_at != math.inf:  # the call expires while it waits
            deadline = info.expires_at if deadline is None else min(deadline, info.expires_at)
        while True:
            self._collect(running, queue)
            if len(queue) >= poll.min_results:
                break
            if deadline is not None and self.clock.time() >= deadline:
                break
            waiters: list[asyncio.Future[Any]] = list(running.values())
            sleeper = None
            if deadline is not None:
                sleeper = asyncio.ensure_future(self.clock.sleep_until(deadline))
                waiters.append(sleeper)
            if not waiters:
                raise RuntimeError(
                    f"call to {info.function!r} waits for results that will never come"
                )
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if self._workers is not None and isinstance(self.clock, VirtualClock):
                    # Results that other workers are computing at this same virtual time
                    # come along, whichever process was quicker: delivery stays as
                    # deterministic as in process.
                    await self.clock._until_unheld()
            finally:
                # Also when this call is cancelled (the environment closes with it in
                # flight): a sleeper left behind would keep the clock's jumper running.
                if sleeper is not None:
                    sleeper.cancel()
        count = min(len(queue), poll.max_results)
        if self._shuffle:
            self._rng.shuffle(queue)
        if self._split and count > poll.min_results:
            count = self._rng.randint(poll.min_results, count)
        delivered, queue[:] = queue[:count], queue[count:]
        return self._resume_request(info, request, poll, delivered, None)

    def _resume_request(
        self,
        info: CallInfo,
        request: function_pb2.RunRequest,
        poll: poll_pb2.Poll,
        results: list[call_pb2.CallResult],
        error: error_pb2.Error | None,
    ) -> function_pb2.RunRequest:
        result = poll_pb2.PollResult(results=results, error=error)
        state = poll.typed_coroutine_state
        if poll.WhichOneof("state") == "coroutine_state":
            result.coroutine_state = poll.coroutine_state
        elif state.type_url == JOURNAL_DELTA_TYPE_URL:
            self._keep_delta(info, journal_pb2.JournalDelta.FromString(state.value))
            last = self._journals[info.id][-1]
            ref = journal_pb2.JournalRef(run_id=last.run_id, polls=last.polls, tag=last.tag)
            result.typed_coroutine_state.type_url = JOURNAL_REF_TYPE_URL
            result.typed_coroutine_state.value = ref.SerializeToString()
        else:
            self._journals.pop(info.id, None)
            result.typed_coroutine_state.CopyFrom(state)
        return function_pb2.RunRequest(
            function=request.function,
            poll_result=result,
            dispatch_id=request.dispatch_id,
            parent_dispatch_id=request.parent_dispatch_id,
            root_dispatch_id=request.root_dispatch_id,
            creation_time=request.creation_time,
        )

    def _keep_delta(self, info: CallInfo, delta: journal_pb2.JournalDelta) -> None:
        """Append a JournalDelta to the journal kept for a call, which it must continue."""
        kept = self._journals.get(info.id)
        if delta.polls_before == 0:
            self._journals[info.id] = [delta]
            return
        if kept is None:
            # The whole journal went last (a cache miss): the deltas go on from it.
            raise RuntimeError(
                f"call {info.id} ({info.function!r}) answered a JournalDelta that continues "
                f"round {delta.polls_before} of a journal the environment does not keep"
            )
        last = kept[-1]
        if last.run_id != delta.run_id or last.polls != delta.polls_before:
            raise RuntimeError(
                f"call {info.id} ({info.function!r}) answered a JournalDelta that continues "
                f"round {delta.polls_before}, but the environment keeps round {last.polls}"
            )
        kept.append(delta)

    def _children(self, info: CallInfo) -> _Poller:
        poller = self._pollers.get(info.id)
        if poller is None:
            poller = self._pollers[info.id] = ({}, [])
        return poller

    @staticmethod
    def _collect(
        running: dict[int, asyncio.Future[call_pb2.CallResult]], queue: list[call_pb2.CallResult]
    ) -> None:
        for correlation_id, task in list(running.items()):
            if task.done():
                del running[correlation_id]
                result = call_pb2.CallResult()
                result.CopyFrom(task.result())
                result.correlation_id = correlation_id
                queue.append(result)


def _journal_needed(response: function_pb2.RunResponse) -> bool:
    return (
        Status(response.status) is Status.INCOMPATIBLE_STATE
        and response.exit.result.error.type == JOURNAL_NEEDED
    )


async def check_determinism(
    target: _Target,
    fn: Function[P, R],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """Run a call under several replay settings and seeds; check the results agree.

    The call runs once with the live cache, then with forced replay at every
    round combined with shuffled and split delivery under seeds 0 to 2. Every run
    reads another time from the ``time`` module (``perturb_time``), so a branch on
    the real time flips between a run and its replay, and reading the clock or
    randomness directly fails the call (``nondeterminism="fail"``), naming the line.

    Returns:
        The call's result.

    Raises:
        errors.NondeterminismError: A replay diverged from its journal, or two
            runs produced different results.
    """
    settings: Sequence[dict[str, Any]] = [
        {},
        {"replay": "always"},
        *({"replay": "always", "shuffle": True, "split": True, "seed": s} for s in range(3)),
    ]
    results: list[tuple[dict[str, Any], Any]] = []
    for setting in settings:
        async with Environment(target, perturb_time=True, **setting) as env:
            results.append((setting, await env.call(fn, *args, **kwargs)))
    first_setting, first = results[0]
    for setting, result in results[1:]:
        if result != first:
            raise NondeterminismError(
                f"{fn.name!r} returned {first!r} with {first_setting or 'the live cache'} "
                f"but {result!r} with {setting}",
            )
    return first  # type: ignore[no-any-return]


async def check_journals(
    target: _Target,
    journals: Iterable[tuple[str, bytes]],
) -> list[JournalReport]:
    """Replay recorded journals against the current code and report which diverge.

    Args:
        target: A `Dispatch`, or the functions the journals belong to.
        journals: ``(label, state)`` pairs, where ``state`` is the serialized
            journal (the value of a Poll's ``typed_coroutine_state``).

    Returns:
        One report per journal, in order.
    """
    if isinstance(target, Dispatch):
        functions: Mapping[str, Function[Any, Any]] = target.functions
    else:
        functions = {f.name: f for f in target}
    runner = Runner(lambda name: f.fn if (f := functions.get(name)) else None, cache_size=0)
    reports = []
    try:
        for label, state in journals:
            found = await runner.check_journal(state)
            reports.append(
                JournalReport(
                    label, found.function, found.problem, found.old_patches, found.app_version
                )
            )
    finally:
        await runner.aclose()
    return reports


def _timed_out(info: CallInfo, failure: str) -> function_pb2.RunResponse:
    """A TIMEOUT answer without a response, with the error the scheduler gives it."""
    response = function_pb2.RunResponse(status=status_pb2.STATUS_TIMEOUT)
    response.exit.result.error.type = Status.TIMEOUT.proto_name
    response.exit.result.error.message = f"function {info.function!r}: {failure}"
    return response


def _expired(info: CallInfo) -> call_pb2.CallResult:
    """The result of a call that expired, as the scheduler writes it."""
    seconds = info.expires_at - info.created_at
    message = (
        f"function {info.function!r}: the call expired: it did not finish within {seconds:.6g} s"
    )
    error = error_pb2.Error(type=Status.TIMEOUT.proto_name, message=message)
    return call_pb2.CallResult(error=error)
