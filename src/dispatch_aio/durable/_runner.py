"""RunRequest -> RunResponse: start, replay, resume, suspend and exit of durable functions.

A ``Run`` is one execution of a function on its own ``DurableLoop``. It
records every durable call and every event applied to it (call results, timer
firings, poll errors) in the journal, which it sends as the coroutine state of
each Poll. A resume continues the live run kept in the ``Runner``'s cache
when the echoed state is exactly the one it sent; otherwise the function is
replayed from the journal: run from the start on a fresh loop, with the
recorded events applied at the same points, and it must make the same calls.

With the journal extension (``journal_delta=True``, which the endpoint sets
when the scheduler announces it; see ``_journal``), a Poll carries only the
round's new segment of the journal, and a resume names the journal by a
``JournalRef``: the live run it names continues, and if the cache does not
hold it the answer is the ``JOURNAL_NEEDED`` signal, upon which the scheduler
sends the whole journal. So a round trip costs what the round changed, not
the length of the history. Since the scheduler keeps the journal, a live run
keeps no copy of it, nor the results it delivered to its code: what grows with
its history is a small record per call.

A function's end is its root task's end. Tasks it started and left running
are cancelled then, as ``asyncio.run()`` does (their ``finally:`` blocks run,
once), and calls they made that had not gone out yet are never made; a
warning names them. A run let go of before its end (evicted from the live
cache, replaced, diverged) runs none of its code: see ``Run.close``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from google.protobuf import any_pb2, duration_pb2

from .._codec import (
    DecodeError,
    EncodeError,
    decode_error,
    decode_input,
    decode_value,
    encode_error,
    encode_value,
    input_digest,
)
from .._status import Classifier, Status
from ..errors import NondeterminismError
from ..proto.sdk.v1 import call_pb2, error_pb2, exit_pb2, function_pb2, poll_pb2, status_pb2
from ..proto.v1 import journal_pb2
from ._context import ATTEMPT, DurableCall, TailCall
from ._detect import PERTURB_STEP, Sources, Watch
from ._journal import (
    JOURNAL_NEEDED,
    JOURNAL_VERSION,
    IncompatibleState,
    JournalNeeded,
    decode_state,
    journal_ref,
    pack_delta,
    pack_state,
    peek_run_id,
)
from ._loop import Clock, DurableFuture, DurableLoop, DurableTask, host_loop_error

__all__ = ["Detection", "DivergencePolicy", "JournalCheck", "Run", "Runner"]

logger = logging.getLogger(__name__)

FunctionLookup = Callable[[str], Callable[..., Awaitable[Any]] | None]

DivergencePolicy = Literal["restart", "fail"]
"""What a divergence from the journal does to its call: ``"restart"`` answers
INCOMPATIBLE_STATE, and the scheduler runs the call again from its input (its leaf
side effects run again); ``"fail"`` ends the call with `errors.NondeterminismError`
(PERMANENT_ERROR), for a person to look at."""

Detection = Literal["off", "warn", "fail"]
"""What reading the clock or randomness directly in a durable function does (see
``_detect``): nothing, a warning logged once per place, or the call fails."""

# Timers due within this margin fire now rather than costing another round trip.
_TIMER_SLACK = 0.005
_MAX_RESULTS = 1000
# Longest a run stays live for connections that are only open (idle), with timers due.
_IDLE_CONNECTION_WAIT = 15.0


class _Diverged(BaseException):
    """Unwinds user code after a divergence.

    It derives from BaseException so that ``except Exception`` does not
    swallow it; do not catch it with a bare ``except:``.
    """


@dataclasses.dataclass(slots=True, eq=False)
class _Call:
    index: int  # correlation id - 1
    identity: str
    function: str
    digest: bytes
    site: str
    epoch: int  # epochs applied when the call was made
    poll: int = 0  # poll in which it was sent; 0 = not yet
    input: any_pb2.Any | None = None  # kept until sent
    endpoint: str = ""
    expiration: float = 0.0  # seconds the scheduler gives the call; 0: its default
    made: bool = False  # made in this process (a journal's calls are made again in replay)
    # The future the code awaits; dropped once resolved, so that a long run does not keep
    # every result it had.
    future: DurableFuture[Any] | None = None
    resolved: bool = False

    def describe(self) -> str:
        return _describe(self.identity, self.function, self.site, self.digest)


@dataclasses.dataclass(frozen=True, slots=True)
class JournalCheck:
    """What replaying a stored journal against the current code found."""

    function: str
    problem: str | None  # why it would not replay, None when it does
    old_patches: tuple[str, ...] = ()  # patches whose old branch the replay took
    app_version: str = ""  # the version that recorded the journal


def _describe_task(task: DurableTask[Any]) -> str:
    coro = task.get_coro()
    coro = getattr(coro, "_coro", coro)  # the function's own, under the loop's bridge
    return f"{getattr(coro, '__qualname__', repr(coro))} (task {task.path})"


def _short_site(site: str) -> str:
    """Keep the last two path components of a call site: enough to find it, small to carry."""
    path, _, line = site.rpartition(":")
    parts = path.replace("\\", "/").rsplit("/", 2)
    return f"{'/'.join(parts[-2:])}:{line}" if path else site


def _describe(identity: str, function: str, site: str, digest: bytes) -> str:
    where = f" at {site}" if site else ""
    return f"call {identity} to {function!r}{where} (input sha256:{digest.hex()[:12]})"


class Run:
    """One execution of a durable function; see the module docstring."""

    def __init__(
        self,
        runner: Runner,
        function: str,
        fn: Callable[..., Awaitable[Any]],
        input: any_pb2.Any,
        run_id: bytes,
        seed: int,
        start_time: float,
        monotonic_offset: float,
        polls: int = 0,
    ) -> None:
        self.runner = runner
        self.function = function
        self.fn = fn
        self.input = input
        self.run_id = run_id
        self.seed = seed
        self.start_time = start_time
        self.monotonic_offset = monotonic_offset
        self.loop = DurableLoop(
            asyncio.get_running_loop(), runner.clock, start_time, monotonic_offset, seed
        )
        self.loop.owner = self
        # The function's own package is the program, even when it is installed.
        self.loop.program_packages = frozenset({getattr(fn, "__module__", "").partition(".")[0]})
        self.calls: list[_Call] = []  # by correlation id - 1
        # Stands for every call delivered live: a live run reads only the flags of a
        # call once delivered, so it keeps one record for all of them (see `_resolve`).
        self._delivered = _Call(
            index=-1,
            identity="",
            function="",
            digest=b"",
            site="",
            epoch=0,
            made=True,
            resolved=True,
        )
        self.by_identity: dict[str, _Call] = {}  # the journal's calls, while replaying
        self.epochs_applied = 0
        self.polls = 0
        self.sent = 0  # calls[:sent] went out in Polls
        self.outstanding = 0  # sent and not resolved
        self.open_calls = 0  # made (in this process) and not resolved
        # The serialized journal as of the last Poll (empty before the first); None once
        # a Poll carried only its new segment: the scheduler keeps the journal then, and
        # this process holds no copy of it.
        self.journal: bytes | None = b""
        self.tag = b""  # random tag of the last Poll, named by a JournalRef
        self.new_epochs: list[journal_pb2.Epoch] = []
        self.replaying = False
        self.divergence: str | None = None
        self.root: DurableTask[Any] | None = None
        self.last_used = 0.0
        self._verified = 0  # while replaying: calls[:_verified] were made again
        self.dispatch_id = ""
        self.generation = 0  # RunRequest.generation: which run of the dispatch id this is
        self.submissions = 0  # calls submitted through the API so far (`submission_key`)
        # Correlation ids of calls whose awaiting task was cancelled, for the next answer
        # (Poll/Exit.abandoned_calls): the scheduler cancels them.
        self.abandoned: list[int] = []
        self.attempt = 0  # the scheduler's number of the attempt being run; 0: unknown
        self.app_version = runner.version
        # patched(): the answer per id, ids the journal records, ids to record next Poll,
        # and the ids whose old branch this run takes.
        self.patches: dict[str, bool] = {}
        self.recorded_patches: frozenset[str] = frozenset()
        self.new_patches: list[str] = []
        self.old_branches: list[str] = []
        # Durable calls made and not yet run (pruned as they run).
        self._made: list[DurableCall] = []
        self._prune_at = 64
        self._warned_unawaited: set[int] = set()
        detect = runner.nondeterminism != "off"
        # Round n of a run ran live with the offset of round n and replays with a later
        # one: a time branch flips between a run and its replay, in any process.
        offset = (polls + 1) * PERTURB_STEP if runner.perturb_time else 0.0
        self.watch: Watch | None = None
        if detect or offset:
            self.watch = Watch(
                self.loop.is_program_frame, offset, detect=detect, sources=runner.sources()
            )

    @functools.cached_property
    def random(self) -> random.Random:
        """The run's generator of random numbers, seeded from the journal (made on use)."""
        return random.Random(self.seed)

    # -- inside the function ----------------------------------------------------

    def submission_key(self) -> str | None:
        """Return the idempotency key of the next call this run submits through the API.

        The dispatch id, the run's generation and the number of submissions before it
        name one submission of one run: the same when the run replays (its code submits
        in the same order), so a replay gets the dispatch id of the first submission
        back instead of creating the call again. None without a dispatch id (the run
        was not started by a scheduler).
        """
        if not self.dispatch_id:
            return None
        self.submissions += 1
        return f"dispatch_aio/{self.dispatch_id}/{self.generation}/{self.submissions}"

    def make_call(
        self,
        function: str,
        input: any_pb2.Any,
        *,
        call_site: str,
        endpoint: str,
        expiration: float = 0.0,
    ) -> DurableFuture[Any]:
        """Record a durable call made by the current task; return the future of its result."""
        if self.loop.discarded:
            raise GeneratorExit  # a finally block of a discarded run (see DurableLoop.discard)
        task = asyncio.current_task()
        if not isinstance(task, DurableTask):
            raise RuntimeError(f"durable call to {function!r} made outside a durable task")
        identity = task.next_identity()
        # 128 bits are plenty to tell inputs apart, and the journal is copied every round.
        digest = input_digest(input)[:16]
        future: DurableFuture[Any] = DurableFuture(loop=self.loop)
        if self.replaying:
            call = self.by_identity.get(identity)
            here = _describe(identity, function, _short_site(call_site), digest)
            if call is None:
                self._diverge(f"the code now makes {here}, which the journal does not have")
            elif call.function != function or call.digest != digest:
                self._diverge(f"the journal has {call.describe()}, but the code now makes {here}")
            assert call is not None
            call.made = True
            call.future = future
            future.add_done_callback(functools.partial(self._abandon, call))
            self.open_calls += 1
            return future
        call = _Call(
            index=len(self.calls),
            identity=identity,
            function=function,
            digest=digest,
            site=_short_site(call_site),
            epoch=self.epochs_applied,
            input=input,
            endpoint=endpoint,
            expiration=expiration,
            made=True,
            future=future,
        )
        self.calls.append(call)  # live: no replay looks it up by identity
        future.add_done_callback(functools.partial(self._abandon, call))
        self.open_calls += 1
        return future

    def _abandon(self, call: _Call, future: DurableFuture[Any]) -> None:
        """Note a call whose future was cancelled before its result came."""
        if future.cancelled() and not call.resolved and call.index + 1 not in self.abandoned:
            self.abandoned.append(call.index + 1)

    def track_call(self, call: DurableCall) -> None:
        """Keep a durable call made by the function until it runs (see `unawaited`)."""
        made = self._made
        made.append(call)
        if len(made) >= self._prune_at:
            made[:] = [c for c in made if not c.started]
            self._prune_at = max(64, 2 * len(made))

    def unawaited(self) -> list[DurableCall]:
        """The durable calls the function made and never ran (never awaited)."""
        self._made[:] = [c for c in self._made if not c.started]
        return list(self._made)

    def patched(self, change: str, *, deprecated: str | None = None) -> bool:
        """Answer ``dispatch_aio.patched(change)`` for this run; see its docstring.

        ``deprecated`` is the call site of ``deprecate_patch(change)``, which needs
        the new branch.
        """
        taken = self.patches.get(change)
        if taken is None:
            if change in self.recorded_patches:
                taken = True
            elif self.replaying:
                # Replaying a journal that passed this point without the patch.
                taken = False
                self.old_branches.append(change)
            else:
                taken = True
                self.new_patches.append(change)
            self.patches[change] = taken
        if deprecated is not None and not taken:
            self._diverge(
                f"the journal was recorded before patch {change!r} and took its old branch, "
                f"which the code removed (deprecate_patch({change!r}) at "
                f"{_short_site(deprecated)}); restore the "
                f"`if patched({change!r}):` test until no such run remains "
                "(dispatch-aio check lists them)"
            )
        return taken

    def _diverge(self, report: str) -> None:
        if self.divergence is None:
            self.divergence = f"function {self.function!r} diverged from its journal: {report}"
        raise _Diverged(self.divergence)

    # -- applying events ----------------------------------------------------------

    def _resolve(
        self, call: _Call, output: any_pb2.Any | None, error: error_pb2.Error | None
    ) -> None:
        if call.resolved:
            return
        call.resolved = True
        if call.poll:
            self.outstanding -= 1
        if call.made:
            self.open_calls -= 1
        future, call.future = call.future, None
        if not self.replaying:  # a replay still checks the journal's calls one by one
            self.calls[call.index] = self._delivered
        if future is None or future.done():
            return  # cancelled while waiting: the late result is ignored
        if error is not None:
            exc = decode_error(error)
            if isinstance(exc, StopIteration | StopAsyncIteration):
                exc = RuntimeError(f"call to {call.function!r} failed with {exc!r}")
            future.set_exception(exc)
            return
        if output is None:
            future.set_result(None)
            return
        try:
            future.set_result(decode_value(output))
        except DecodeError as exc:
            future.set_exception(exc)

    def _reject_poll(self, poll: int, error: error_pb2.Error) -> None:
        for call in self.calls:
            if call.poll == poll and not call.resolved:
                self._resolve(call, None, error)

    def apply_poll_result(self, result: poll_pb2.PollResult) -> None:
        """Apply a PollResult's events live, as a new epoch."""
        # I/O that completed while the run was suspended comes first, as it came
        # first; the epoch records how many operations completed before it.
        self._step()
        events: list[journal_pb2.Event] = []
        if result.HasField("error"):
            events.append(
                journal_pb2.Event(
                    poll_error=journal_pb2.PollError(poll=self.polls, error=result.error)
                )
            )
        seen: set[int] = set()
        for res in result.results:
            index = res.correlation_id - 1
            if not 0 <= index < self.sent or self.calls[index].resolved or index in seen:
                logger.debug(
                    "ignoring a result for unknown or already resolved correlation id %d of %s",
                    res.correlation_id,
                    self.function,
                )
                continue
            seen.add(index)
            kept = call_pb2.CallResult(correlation_id=res.correlation_id)
            if res.HasField("output"):
                kept.output.CopyFrom(res.output)
            if res.HasField("error"):
                kept.error.CopyFrom(res.error)
            events.append(journal_pb2.Event(result=kept))
        if events:
            self._apply_live(events, during_io=False)

    def _apply_live(self, events: list[journal_pb2.Event], during_io: bool) -> None:
        now = max(self.runner.clock.time(), self.loop.unix_time())
        self.loop.set_epoch_time(now)
        self.epochs_applied += 1
        self.new_epochs.append(
            journal_pb2.Epoch(
                time=now, during_io=during_io, events=events, io_done=self.loop.completed
            )
        )
        for event in events:
            self._apply(event)

    def _apply(self, event: journal_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "result":
            res = event.result
            index = res.correlation_id - 1
            if not 0 <= index < len(self.calls):
                raise IncompatibleState(
                    f"the journal has a result for unknown call {res.correlation_id}"
                )
            call = self.calls[index]
            if not call.made:
                self._diverge(f"the journal has {call.describe()}, which the code no longer makes")
            self._resolve(
                call,
                res.output if res.HasField("output") else None,
                res.error if res.HasField("error") else None,
            )
        elif kind == "timer":
            timer = self.loop.durable_timer(event.timer)
            if timer is None:
                self._diverge(
                    f"the journal has timer {event.timer} firing, which the code no longer sets"
                )
            assert timer is not None
            self.loop.fire(timer)
        elif kind == "poll_error":
            self._reject_poll(event.poll_error.poll, event.poll_error.error)
        else:
            raise IncompatibleState("the journal has an event of an unknown kind")

    def _fire_due_timers(self) -> bool:
        due = self.loop.due_timers(self.runner.clock.time() + _TIMER_SLACK)
        if not due:
            return False
        durable = [t for t in due if t.identity is not None]
        if durable:
            events = [journal_pb2.Event(timer=t.identity) for t in durable if t.identity]
            self._apply_live(events, during_io=self.loop.io_inflight > 0)
        for timer in due:
            if timer.identity is None:
                self.loop.fire(timer)
        return True

    # -- stepping -----------------------------------------------------------------

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Create the root task running the function."""
        fn = self.fn

        async def main() -> Any:
            return await fn(*args, **kwargs)

        self.root = self.loop.create_root_task(main())

    def _step(self) -> None:
        # sys.exit() in a function: the task that raised it holds it as its
        # exception, and the function fails with it; the endpoint goes on.
        with contextlib.suppress(SystemExit):
            if self.watch is None:
                self.loop.step()
            else:
                # Code replayed ran live once, watched then (see Watch.detect).
                self.watch.detect = not self.replaying and self.runner.nondeterminism != "off"
                with self.watch:
                    self.loop.step()

    def _io_holds_back(self) -> bool:
        """Whether to wait for I/O before going on (live: suspending; replay: the next epoch).

        Forwarded operations end by themselves. An open connection, a volatile
        timer (a library's timeout or back-off, a timer set from a callback), or a
        thread the function started (which may call ``call_soon_threadsafe()``)
        may still deliver what a task waits for, unless calls are pending: then the
        function suspends, and they carry on in the live run. The same rule
        holds on replay.
        """
        loop = self.loop
        if loop.operations_inflight:
            return True
        soft = loop.io_inflight or loop.volatile_timers or loop.threads_alive
        return bool(soft) and not self.open_calls

    async def settle(self, *, wait_io: bool) -> None:
        """Replay: run until no callback is ready (and, if asked, no I/O is in flight)."""
        while True:
            self._step()
            if self.divergence is not None:
                return
            if wait_io and self._io_holds_back():
                await self._wait_for_io()
                continue
            return

    async def settle_for(self, epoch: journal_pb2.Epoch | None, number: int | None) -> None:
        """Replay: run until epoch ``number`` can be applied where it was applied live.

        That is once as many forwarded operations have completed as had live
        (later results are held back), and once what its events refer to (the
        calls made before it, its calls and timers) exists, waiting for I/O and
        volatile timers as long as it does not. With no epoch: until every
        recorded call was made again, where the live run suspended.
        """
        loop = self.loop
        limit = None if epoch is None else epoch.io_done
        loop.set_completion_limit(limit)
        while True:
            self._step()
            if self.divergence is not None:
                return
            if limit is not None and loop.completed < limit and loop.operations_inflight:
                await self._wait_for_io()
                continue
            if not self._applicable(epoch, number) and (
                loop.io_running or loop.volatile_timers or loop.threads_alive
            ):
                await self._wait_for_io()
                continue
            return

    def _applicable(self, epoch: journal_pb2.Epoch | None, number: int | None) -> bool:
        calls = self.calls
        for call in calls[self._verified :]:
            if number is not None and call.epoch > number:
                break
            if not call.made:
                return False
        if epoch is None:
            return True
        for event in epoch.events:
            kind = event.WhichOneof("kind")
            if kind == "result":
                index = event.result.correlation_id - 1
                if 0 <= index < len(calls) and not calls[index].made:
                    return False
            elif kind == "timer" and self.loop.durable_timer(event.timer) is None:
                return False
        return True

    async def _wait_for_io(self) -> None:
        """Wait until I/O wakes the loop or a volatile timer is due, and fire those due."""
        loop = self.loop
        timer = loop.next_timer(durable=False)
        await loop.wait(None if timer is None else timer.deadline)
        for due in loop.due_timers(self.runner.clock.time(), durable=False):
            loop.fire(due)

    async def drive(self) -> str:
        """Run live until the function exits, must suspend, diverges or can never resume.

        Returns:
            "exit", "suspend", "diverged", "stuck", or "forever" (only timers that
            never fire are left).
        """
        loop = self.loop
        runner = self.runner
        assert self.root is not None
        transports_since: float | None = None
        while True:
            self._step()
            if self.divergence is not None:
                return "diverged"
            if self.root.done():
                return "exit"
            if self._fire_due_timers():
                continue
            if self.sent < len(self.calls):
                # New calls go out now, whatever I/O is in flight: it carries on in
                # the live run, and a replay re-executes it.
                return "suspend"
            if self._io_holds_back():
                if loop.operations_inflight:
                    transports_since = None
                elif transports_since is None:
                    transports_since = runner.clock.time()
                elif (
                    loop.next_timer(durable=True) is not None
                    and runner.clock.time() - transports_since > _IDLE_CONNECTION_WAIT
                ):
                    # Only idle connections (a pool, a session) keep it live: suspend.
                    return "suspend"
                timer = loop.next_timer()
                await loop.wait(None if timer is None else timer.deadline)
                continue
            transports_since = None
            durable = loop.next_timer(durable=True)
            if durable is not None and math.isfinite(durable.deadline):
                if durable.deadline - runner.clock.time() <= runner.live_timer_threshold:
                    await loop.wait(durable.deadline)
                    continue
                return "suspend"
            if self.outstanding:
                return "suspend"
            if durable is not None:
                return "forever"  # asyncio.sleep(math.inf), and nothing else can happen
            # Timers set outside any task are not durable: a replay would not fire
            # them at this point, so they are not waited for here either.
            if await loop.linger():
                continue
            return "stuck"

    # -- answers ------------------------------------------------------------------

    def suspend(self, *, delta: bool = False) -> function_pb2.RunResponse:
        """Answer with a Poll carrying the new calls and the journal.

        Args:
            delta: Carry only the journal's new segment, as a JournalDelta.
        """
        polls_before = self.polls
        self.polls += 1
        new_calls = self.calls[self.sent :]
        for call in new_calls:
            call.poll = self.polls
        self.sent = len(self.calls)
        self.outstanding += len(new_calls)
        added = journal_pb2.Journal(
            polls=self.polls,
            patches=self.new_patches,
            epochs=self.new_epochs,
            calls=[
                journal_pb2.CallRecord(
                    identity=c.identity,
                    function=c.function,
                    input_digest=c.digest,
                    call_site=c.site,
                    epoch=c.epoch,
                    poll=c.poll,
                )
                for c in new_calls
            ],
        )
        if not polls_before:  # the journal's first segment: its header goes with it
            added.version = JOURNAL_VERSION
            added.function = self.function
            added.input.CopyFrom(self.input)
            added.run_id = self.run_id
            added.seed = self.seed
            added.start_time = self.start_time
            added.monotonic_offset = self.monotonic_offset
            added.app_version = self.app_version
        segment = added.SerializeToString()
        self.new_patches = []
        self.tag = os.urandom(8)
        self.new_epochs = []
        if delta:
            self.journal = None  # the scheduler appends the segment to the journal it keeps
            state = pack_delta(
                journal_pb2.JournalDelta(
                    run_id=self.run_id,
                    polls_before=polls_before,
                    polls=self.polls,
                    segment=segment,
                    tag=self.tag,
                )
            )
        else:
            # A run whose journal went out in deltas is resumed by a JournalRef only, and
            # a resume without the extension replays it (see `Runner._resume`).
            assert self.journal is not None
            self.journal += segment
            state = pack_state(self.journal)
        poll = poll_pb2.Poll(
            typed_coroutine_state=state,
            min_results=1,
            max_results=max(1, min(self.outstanding, _MAX_RESULTS)),
            abandoned_calls=self.abandoned,
        )
        self.abandoned = []
        for call in new_calls:
            assert call.input is not None
            made = call_pb2.Call(
                correlation_id=call.index + 1,
                function=call.function,
                input=call.input,
                endpoint=call.endpoint,
            )
            if call.expiration > 0:
                millis = math.ceil(call.expiration * 1000)
                made.expiration.seconds, made.expiration.nanos = divmod(millis, 1000)
                made.expiration.nanos *= 1_000_000
            poll.calls.append(made)
            call.input = None
        timer = self.loop.next_timer(durable=True)
        if timer is not None and math.isfinite(timer.deadline):
            wait = max(1.0, timer.deadline - self.runner.clock.time())
            millis = math.ceil(wait * 1000)
            poll.max_wait.CopyFrom(
                duration_pb2.Duration(seconds=millis // 1000, nanos=millis % 1000 * 1_000_000)
            )
        return function_pb2.RunResponse(status=_wire(Status.OK), poll=poll)

    def exit(self) -> function_pb2.RunResponse:
        """Answer with the function's result, error or tail call."""
        response = self._exit()
        if response.WhichOneof("directive") == "exit":
            response.exit.abandoned_calls.extend(self.abandoned)
        self.abandoned = []
        return response

    def _exit(self) -> function_pb2.RunResponse:
        root = self.root
        assert root is not None and root.done()
        classifier = self.runner.classifier
        exc: BaseException | None
        if root.cancelled():
            exc = asyncio.CancelledError(f"function {self.function!r} was cancelled")
        else:
            exc = root.exception()
            exc = host_loop_error(exc) or exc
        if isinstance(exc, TailCall):
            tail = call_pb2.Call(function=exc.function, input=exc.input)
            return function_pb2.RunResponse(
                status=_wire(Status.OK), exit=exit_pb2.Exit(tail_call=tail)
            )
        if exc is None:
            exc = self._unawaited_error()
        if exc is None:
            value = root.result()
            try:
                status = classifier.status_for_output(value)
                result = call_pb2.CallResult()
                if value is not None:
                    result.output.CopyFrom(
                        encode_value(value, context=f"the result of {self.function!r}")
                    )
            except EncodeError as error:
                exc = error
            else:
                return function_pb2.RunResponse(
                    status=_wire(status), exit=exit_pb2.Exit(result=result)
                )
        return error_response(exc, classifier.status_for_error(exc))

    def warn_unawaited(self) -> None:
        """Name the durable calls made and not awaited when the function suspends.

        Awaiting one later is valid, so this only warns; the return fails (see `exit`).
        """
        if self.replaying:
            return
        for call in self.unawaited():
            if id(call) in self._warned_unawaited:
                continue
            self._warned_unawaited.add(id(call))
            logger.warning(
                "function %r suspends with a durable call to %r made at %s and not awaited "
                "(it is made only once awaited); did you mean `await %s(...)`?",
                self.function,
                call.function,
                call.site or "?",
                call.function.rpartition(".")[2],
            )

    def _unawaited_error(self) -> RuntimeError | None:
        pending = self.unawaited()
        if not pending:
            return None
        where = ", ".join(f"{c.function!r} at {c.site or '?'}" for c in pending)
        return RuntimeError(
            f"function {self.function!r} returned with durable calls it never awaited: "
            f"{where}; a durable call is made only when awaited (write `await "
            f"{pending[0].function.rpartition('.')[2]}(...)`, or gather the calls)"
        )

    def warn_left_running(self) -> None:
        """Name the tasks the function started and left running when it returned.

        As ``asyncio.run()`` does, they are cancelled when the function ends, and
        calls they made that had not gone out yet are never made. That is easy to
        do by mistake (``create_task()`` without keeping or awaiting the task), so
        it is said, with the calls lost.
        """
        left = [
            t for t in self.loop.tasks() if not t.done() and not t.volatile and t is not self.root
        ]
        if not left or self.replaying:
            return
        unsent = sorted({c.function for c in self.calls[self.sent :]})
        lost = f"; calls never made: {', '.join(map(repr, unsent))}" if unsent else ""
        logger.warning(
            "function %r returned while tasks it started were still running: %s; they are "
            "cancelled, as asyncio.run() does%s. Await them (or use an asyncio.TaskGroup) "
            "before returning",
            self.function,
            ", ".join(_describe_task(t) for t in left),
            lost,
        )

    async def finish(self) -> None:
        """Tear the loop down at the function's real end: cancel its tasks and forwarded I/O."""
        await self.loop.teardown()

    async def close(self) -> None:
        """Let go of the run before its end, without running any of its code.

        Its I/O is stopped and its loop parked (see DurableLoop.park); the
        function's cleanup code runs at its real end, in whichever run gets there.
        """
        self.loop.park()


def error_response(exc: BaseException, status: Status) -> function_pb2.RunResponse:
    """Build an Exit response carrying ``exc``."""
    result = call_pb2.CallResult(error=encode_error(exc))
    return function_pb2.RunResponse(status=_wire(status), exit=exit_pb2.Exit(result=result))


class Runner:
    """Runs RunRequests of registered functions; keeps suspended runs live in a cache.

    Args:
        lookup: Returns the coroutine function registered under a name, or None.
        classifier: Maps results and exceptions to statuses.
        cache_size: Most suspended runs kept live; 0 disables the cache (every
            resume replays from the journal).
        cache_idle_timeout: Seconds after which an unused live run is dropped.
        live_timer_threshold: Timers due within this many seconds are waited
            out live instead of suspending the function.
        clock: Source of time; tests pass a virtual clock.
        parked_limit: Most runs let go of before their end (evicted, replaced,
            diverged) kept suspended so that their cleanup code never runs; past
            it the oldest are discarded, running their ``finally:`` blocks.
        on_divergence: What a divergence from the journal does to its call (see
            `DivergencePolicy`): ``"restart"`` from its input, or ``"fail"``.
        divergence_policy: The policy of one function by name, or None to use
            ``on_divergence``.
        nondeterminism: What reading the wall clock, the global ``random``,
            ``uuid.uuid4``, ``os.urandom`` or ``secrets`` directly inside a durable
            function does (see `Detection`); it counts only for functions that
            suspend, since a run that ends in its first round never replays.
        perturb_time: Shift the time read through the ``time`` module while a run
            steps, by an offset that grows with the round, so that a branch on it flips
            on replay (for tests on a virtual clock; see ``_detect``).
        version: The application's version, recorded in the journals of the runs it
            starts and named in divergence reports.
    """

    def __init__(
        self,
        lookup: FunctionLookup,
        *,
        classifier: Classifier | None = None,
        cache_size: int = 1024,
        cache_idle_timeout: float = 300.0,
        live_timer_threshold: float = 1.0,
        clock: Clock | None = None,
        parked_limit: int = 1024,
        on_divergence: DivergencePolicy = "restart",
        divergence_policy: Callable[[str], DivergencePolicy | None] | None = None,
        nondeterminism: Detection = "off",
        perturb_time: bool = False,
        version: str = "",
    ) -> None:
        if on_divergence not in ("restart", "fail"):
            raise ValueError(f"on_divergence must be 'restart' or 'fail', not {on_divergence!r}")
        if nondeterminism not in ("off", "warn", "fail"):
            raise ValueError(
                f"nondeterminism must be 'off', 'warn' or 'fail', not {nondeterminism!r}"
            )
        self.on_divergence = on_divergence
        self.divergence_policy = divergence_policy
        self.nondeterminism = nondeterminism
        self.perturb_time = perturb_time
        self.version = version
        self._warned_reads: set[tuple[str, str]] = set()
        self._sources: Sources | None = None
        self.lookup = lookup
        self.parked_limit = parked_limit
        self._parked: collections.deque[Run] = collections.deque()
        self._warned_discard = False
        self.classifier = classifier or Classifier()
        self.cache_size = cache_size
        self.cache_idle_timeout = cache_idle_timeout
        self.live_timer_threshold = live_timer_threshold
        self.clock = clock or Clock()
        self._cache: collections.OrderedDict[bytes, Run] = collections.OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    def sources(self) -> Sources:
        """The functions the nondeterminism detection watches (looked up once)."""
        if self._sources is None:
            self._sources = Sources()
        return self._sources

    def policy(self, function: str) -> DivergencePolicy:
        """The divergence policy of a function."""
        chosen = self.divergence_policy(function) if self.divergence_policy else None
        return chosen or self.on_divergence

    def _diverged(self, function: str, dispatch_id: str, report: str) -> function_pb2.RunResponse:
        """Log a divergence and answer it as the function's policy says."""
        policy = self.policy(function)
        what = "restarts from its input" if policy == "restart" else "fails"
        logger.warning(
            "call %s of %r diverged from its journal and %s (on_divergence=%r): %s",
            dispatch_id or "?",
            function,
            what,
            policy,
            report,
        )
        status = Status.INCOMPATIBLE_STATE if policy == "restart" else Status.PERMANENT_ERROR
        return error_response(NondeterminismError(report), status)

    async def run(
        self,
        request: function_pb2.RunRequest,
        *,
        journal_delta: bool = False,
        cancel: bool = False,
    ) -> function_pb2.RunResponse:
        """Run one request; never raises for anything the request or the function does.

        Args:
            request: The request.
            journal_delta: The scheduler announced the journal extension: a Poll
                may carry only the journal's new segment (when the live cache is on,
                since a resume must find the run there to use it).
            cancel: The scheduler cancels the call: a resume raises ``CancelledError``
                at the function's pending await and runs it to its end (see `_cancel`).
        """
        try:
            return await self._run(request, journal_delta and self.cache_size > 0, cancel)
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except BaseException as exc:
            logger.exception("internal error while running %r", request.function)
            return error_response(exc, Status.TEMPORARY_ERROR)

    async def _run(
        self, request: function_pb2.RunRequest, delta: bool, cancel: bool = False
    ) -> function_pb2.RunResponse:
        fn = self.lookup(request.function)
        if fn is None:
            return _failure(
                Status.NOT_FOUND, "NotFoundError", f"function {request.function!r} does not exist"
            )
        directive = request.WhichOneof("directive")
        if directive == "poll_result":
            try:
                run = await self._resume(request, fn, delta)
            except JournalNeeded as exc:
                logger.debug("%s: %s; asking for the whole journal", request.function, exc)
                return _failure(Status.INCOMPATIBLE_STATE, JOURNAL_NEEDED, str(exc))
            except IncompatibleState as exc:
                logger.warning("cannot resume %s, it restarts: %s", request.function, exc)
                return _failure(Status.INCOMPATIBLE_STATE, "IncompatibleStateError", str(exc))
            except NondeterminismError as exc:
                return self._diverged(request.function, request.dispatch_id, str(exc))
        else:
            try:
                run = self._first(request, fn)
            except DecodeError as exc:
                return error_response(exc, Status.INVALID_ARGUMENT)
        run.dispatch_id = request.dispatch_id
        run.generation = request.generation
        run.attempt = ATTEMPT.get()
        try:
            if cancel and directive == "poll_result":
                return await self._cancel(run)
            return await self._continue(run, delta)
        except BaseException:
            await self._let_go(run)
            raise

    def _first(self, request: function_pb2.RunRequest, fn: Callable[..., Awaitable[Any]]) -> Run:
        args, kwargs = decode_input(request.input)
        now = self.clock.time()
        run = Run(
            self,
            request.function,
            fn,
            request.input,
            (ids := os.urandom(24))[:16],  # the run's id, then its seed
            int.from_bytes(ids[16:], "big"),
            now,
            now - time.monotonic(),
        )
        run.dispatch_id, run.generation = request.dispatch_id, request.generation
        run.start(args, kwargs)
        return run

    async def _resume(
        self, request: function_pb2.RunRequest, fn: Callable[..., Awaitable[Any]], delta: bool
    ) -> Run:
        ref = journal_ref(request.poll_result)
        run = await self._take(request) if ref is None else await self._take_ref(request, ref)
        if run is not None and run.journal is None and not delta:
            # Its journal went out in deltas, and this resume wants the whole journal back
            # (a JournalRef without the extension's header): only the scheduler has it.
            await self._let_go(run)
            raise JournalNeeded(f"run {run.run_id.hex()} sent its journal in deltas")
        if run is None:
            journal, state = decode_state(request.poll_result, request.function)
            run = await self._replay(journal, state, fn, request)
        run.apply_poll_result(request.poll_result)
        return run

    async def _continue(self, run: Run, delta: bool) -> function_pb2.RunResponse:
        outcome = await run.drive()
        refusal = self._nondeterministic(run, outcome)
        if outcome == "suspend" and refusal is None:
            run.warn_unawaited()
            response = run.suspend(delta=delta)
            await self._keep(run)
            return response
        if outcome in ("diverged", "suspend"):
            await self._let_go(run)  # not its end: it restarts from its input, or fails
        else:
            if outcome == "exit":
                run.warn_left_running()
            await run.finish()
        if refusal is not None:
            return refusal
        if outcome == "exit":
            return run.exit()
        if outcome == "diverged":
            assert run.divergence is not None
            return self._diverged(run.function, run.dispatch_id, run.divergence)
        if outcome == "forever":
            return _failure(
                Status.PERMANENT_ERROR,
                "DeadlockError",
                f"function {run.function!r} waits only for a timer that never fires "
                "(asyncio.sleep(math.inf), or a timeout of infinity): no durable call, "
                "other timer or I/O is pending",
            )
        return _failure(
            Status.PERMANENT_ERROR,
            "DeadlockError",
            f"function {run.function!r} waits for something that nothing will complete: "
            "no durable call, timer or I/O is pending (it may await a future or event "
            "that no task resolves, or a timer set by loop.call_later() from a callback, "
            "which is not durable: set timers from a task)",
        )

    async def _cancel(self, run: Run) -> function_pb2.RunResponse:
        """Raise ``CancelledError`` at the function's pending await; answer with its end.

        The call ends with this resume whatever the function does, so the run ends
        here too: if it suspends again (it caught the cancellation and awaits more),
        its tasks are cancelled as at any end, and the Poll is never sent.
        """
        assert run.root is not None
        run.root.cancel()
        outcome = await run.drive()
        if outcome == "exit":
            run.warn_left_running()
        await run.finish()
        if outcome == "exit":
            return run.exit()
        return _failure(
            Status.PERMANENT_ERROR,
            "CancelledError",
            f"function {run.function!r} was cancelled and did not end ({outcome})",
        )

    def _nondeterministic(self, run: Run, outcome: str) -> function_pb2.RunResponse | None:
        """Report direct reads of the clock or randomness; the failure to answer, if any.

        They count once the function suspends (now or before): a run that ends in its
        first round never replays.
        """
        watch = run.watch
        if watch is None or not watch.reads or self.nondeterminism == "off":
            return None
        if outcome not in ("exit", "suspend") or (outcome == "exit" and not run.polls):
            return None
        report = (
            f"function {run.function!r} reads values that differ on replay directly, so it "
            "may take another branch when it replays: "
            + "; ".join(read.describe() for read in watch.reads)
        )
        if self.nondeterminism == "fail":
            return error_response(NondeterminismError(report), Status.PERMANENT_ERROR)
        fresh = [r for r in watch.reads if (run.function, r.site) not in self._warned_reads]
        if fresh:
            self._warned_reads.update((run.function, r.site) for r in fresh)
            logger.warning("%s", report)
        return None

    async def _replay(
        self,
        journal: journal_pb2.Journal,
        state: bytes,
        fn: Callable[..., Awaitable[Any]],
        request: function_pb2.RunRequest | None = None,
    ) -> Run:
        try:
            args, kwargs = decode_input(journal.input)
        except DecodeError as exc:
            raise IncompatibleState(f"the journal's input cannot be decoded: {exc}") from None
        run = Run(
            self,
            journal.function,
            fn,
            journal.input,
            journal.run_id,
            journal.seed,
            journal.start_time,
            journal.monotonic_offset,
            journal.polls,
        )
        if request is not None:  # known before the code runs again: see `submission_key`
            run.dispatch_id, run.generation = request.dispatch_id, request.generation
        run.replaying = run.loop.replaying = True
        run.recorded_patches = frozenset(journal.patches)
        run.app_version = journal.app_version
        for index, record in enumerate(journal.calls):
            call = _Call(
                index=index,
                identity=record.identity,
                function=record.function,
                digest=record.input_digest,
                site=record.call_site,
                epoch=record.epoch,
                poll=record.poll,
            )
            run.calls.append(call)
            run.by_identity[record.identity] = call
        run.sent = len(run.calls)
        run.outstanding = run.sent
        run.polls = journal.polls
        run.journal = state
        try:
            run.start(args, kwargs)
            for number, epoch in enumerate(journal.epochs):
                if epoch.HasField("io_done"):
                    await run.settle_for(epoch, number)
                else:  # written before io_done existed
                    run.loop.set_completion_limit(None)
                    await run.settle(wait_io=not epoch.during_io)
                self._check_replay(run, number)
                run.loop.set_epoch_time(epoch.time)
                run.epochs_applied += 1
                for event in epoch.events:
                    run._apply(event)
            await run.settle_for(None, None)
            self._check_replay(run, None)
        except _Diverged:
            await self._let_go(run)
            assert run.divergence is not None
            report = run.divergence
            if run.app_version != self.version:
                report += (
                    f" (the journal was recorded by version {run.app_version or '(unset)'} "
                    f"of the application; this is version {self.version or '(unset)'})"
                )
            raise NondeterminismError(report) from None
        except BaseException:
            await self._let_go(run)
            raise
        run.replaying = run.loop.replaying = False
        run.by_identity.clear()  # only a replay looks calls up by their identity
        run.calls = [run._delivered if c.resolved else c for c in run.calls]
        return run

    def _check_replay(self, run: Run, epoch: int | None) -> None:
        """Check that the calls recorded before ``epoch`` (all if None) were made again."""
        if run.divergence is not None:
            raise _Diverged(run.divergence)
        calls = run.calls
        while run._verified < len(calls) and (epoch is None or calls[run._verified].epoch <= epoch):
            call = calls[run._verified]
            if not call.made:
                run.divergence = (
                    f"function {run.function!r} diverged from its journal: the journal has "
                    f"{call.describe()}, which the code no longer makes"
                )
                raise _Diverged(run.divergence)
            run._verified += 1
        assert run.root is not None
        if run.root.done():
            run.divergence = (
                f"function {run.function!r} diverged from its journal: it returned while "
                "replaying, before all recorded events were applied"
            )
            raise _Diverged(run.divergence)

    async def check_journal(self, state: bytes) -> JournalCheck:
        """Replay a serialized journal against the current code without running further.

        Returns:
            The journal's function, why it would not replay (a divergence, an
            unusable state) or None when it replays, and the patches whose old
            branch its replay takes (it still needs them).
        """
        result = poll_pb2.PollResult(typed_coroutine_state=pack_state(state))
        try:
            header = journal_pb2.Journal.FromString(state)
            function, version = header.function, header.app_version
        except Exception:
            function, version = "", ""
        fn = self.lookup(function)
        if fn is None:
            return JournalCheck(function, f"function {function!r} does not exist (any more)")
        try:
            journal, state = decode_state(result, function)
            run = await self._replay(journal, state, fn)
        except (IncompatibleState, NondeterminismError) as exc:
            return JournalCheck(function, str(exc), app_version=version)
        await self._let_go(run)
        return JournalCheck(function, None, tuple(run.old_branches), version)

    # -- live cache -----------------------------------------------------------------

    async def _take(self, request: function_pb2.RunRequest) -> Run | None:
        """Return the live run this resume continues, if the cache has it.

        A hit needs no decoding: the echoed state must be byte for byte the
        one the live run sent.
        """
        result = request.poll_result
        if not self._cache or result.WhichOneof("state") != "typed_coroutine_state":
            return None
        state = result.typed_coroutine_state.value
        run_id = peek_run_id(state)
        run = None if run_id is None else self._cache.pop(run_id, None)
        if run is None:
            return None
        if run.journal != state or run.function != request.function:
            # Another round of the same run (a retry, another replica's state): replay.
            await self._let_go(run)
            return None
        return run

    def awaits_only(self, request: function_pb2.RunRequest, correlation_id: int) -> bool:
        """Whether `request` resumes a run held live here that awaits one call alone.

        True when the run its JournalRef names is in the cache at that very round, and
        the call `correlation_id` is the only one it sent and has no result for yet:
        then that call's result is all its resume can carry.
        """
        try:
            ref = journal_ref(request.poll_result)
        except IncompatibleState:
            return False
        run = None if ref is None else self._cache.get(ref.run_id)
        if (
            ref is None
            or run is None
            or (run.polls, run.tag, run.function) != (ref.polls, ref.tag, request.function)
            or run.outstanding != 1
            or not 0 < correlation_id <= len(run.calls)
        ):
            return False
        call = run.calls[correlation_id - 1]
        return call.poll > 0 and not call.resolved

    async def _take_ref(self, request: function_pb2.RunRequest, ref: journal_pb2.JournalRef) -> Run:
        """Return the live run a JournalRef names.

        Raises:
            JournalNeeded: The cache does not hold that very round of the run.
        """
        run = self._cache.pop(ref.run_id, None)
        if run is None:
            raise JournalNeeded(f"run {ref.run_id.hex()} is not held live here")
        if run.polls != ref.polls or run.tag != ref.tag or run.function != request.function:
            # Another round of the run (a retried request, a response that was lost).
            await self._let_go(run)
            raise JournalNeeded(
                f"run {ref.run_id.hex()} is held live at round {run.polls}, not at the "
                f"round {ref.polls} the scheduler kept"
            )
        return run

    async def _keep(self, run: Run) -> None:
        if self.cache_size <= 0 or self._closed:
            await self._let_go(run)
            return
        run.last_used = time.monotonic()
        evicted = []
        replaced = self._cache.pop(run.run_id, None)
        if replaced is not None and replaced is not run:
            # Two resumes of one run ran at once (a retried request): keep the newer.
            evicted.append(replaced)
        self._cache[run.run_id] = run
        while len(self._cache) > self.cache_size:
            evicted.append(self._cache.popitem(last=False)[1])
        evicted.extend(self._expired())
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        for old in evicted:
            await self._let_go(old)

    async def _let_go(self, run: Run) -> None:
        """Let go of a run before its end without running its cleanup code (see Run.close).

        Parked runs are kept, up to ``parked_limit``; past it the oldest are
        discarded, which runs their ``finally:`` blocks early: say so once.
        """
        await run.close()
        if self._closed:
            run.loop.discard()  # nothing would discard it later
            return
        self._parked.append(run)
        while len(self._parked) > self.parked_limit:
            oldest = self._parked.popleft()
            oldest.loop.discard()
            if not self._warned_discard:
                self._warned_discard = True
                logger.warning(
                    "more than %d suspended runs were let go of (parked_limit): the oldest, "
                    "of %r, is discarded and its finally blocks run now rather than at its end",
                    self.parked_limit,
                    oldest.function,
                )

    def _expired(self) -> list[Run]:
        """Remove and return the cached runs unused for longer than the idle timeout."""
        now = time.monotonic()
        expired = []
        while self._cache:
            oldest = next(iter(self._cache.values()))
            if now - oldest.last_used <= self.cache_idle_timeout:
                break
            expired.append(self._cache.popitem(last=False)[1])
        return expired

    async def _sweep(self) -> None:
        """Drop idle runs even when no request comes to do it; ends with the cache."""
        while self._cache:
            oldest = next(iter(self._cache.values()))
            delay = oldest.last_used + self.cache_idle_timeout - time.monotonic()
            await asyncio.sleep(max(delay, 0.0) + 0.01)
            for old in self._expired():
                await self._let_go(old)

    async def aclose(self) -> None:
        """Let go of every live run in the cache, and discard the parked runs.

        Runs still in flight are let go of when they suspend.
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        while self._cache:
            _, run = self._cache.popitem()
            await self._let_go(run)
        while self._parked:
            self._parked.popleft().loop.discard()


def _failure(status: Status, type_name: str, message: str) -> function_pb2.RunResponse:
    error = error_pb2.Error(type=type_name, message=message)
    result = call_pb2.CallResult(error=error)
    return function_pb2.RunResponse(status=_wire(status), exit=exit_pb2.Exit(result=result))


def _wire(status: Status) -> status_pb2.Status.ValueType:
    return status_pb2.Status.ValueType(status)
