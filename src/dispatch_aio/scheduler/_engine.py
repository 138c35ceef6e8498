"""The call state machine of the local scheduler.

Every unfinished call lives in memory (`_Live`) and every change is written through
the `Store` before anything depends on it: a child's Run is sent only once the Poll
that made it is committed, a poller's answer to a result is acted on only once that
result is committed in its queue (with the answer itself, or before it), a result is
given to those waiting for it only once committed, and a submission is acknowledged
only once its calls are committed.

A call is PENDING (run from its input at `due_at`), SUSPENDED (polled) or DONE. Each
attempt sends one RunRequest; its outcome moves the call:

- ``exit`` with a ``tail_call``, whatever the status: the same dispatch id runs the new
  function and input (same parent, root, creation and expiration times); the
  generation is incremented so that results meant for the old run are dropped.
- ``poll`` (status OK): the calls are validated; if any is invalid, none is dispatched
  and the next resume carries ``PollResult.error``. Otherwise each becomes a child
  (endpoint defaults to the poller's). The poller resumes when its queue holds
  ``min_results`` results, when ``max_wait`` elapses, or on the poll error; a resume
  delivers at most ``max_results`` results (oldest first) and echoes the state, same
  oneof member, same bytes. Delivered results leave the queue only when the response
  to the resume is committed, so a failed resume delivers them again.
- ``exit`` with status OK, or a non-temporary status: the call is DONE. A non-OK
  result without an error gets one (``type`` is the status's protobuf name, e.g.
  ``STATUS_NOT_FOUND``). The result is queued for the parent with the correlation id
  the parent gave. When it is the result that makes a suspended parent ready, the
  parent is resumed with it at once, and the writes that finish the child are
  carried into the parent's next write: a chain of calls commits once per step, not
  twice. Nothing the parent's answer asks for (calls, a result, a retry) happens
  before that joint commit, so a result is never acted on before it is durable; a
  crash before it loses the round, and the child runs again, as a crash during any
  round would. A resume slower than `_CARRY_WAIT` does not hold the child's result
  back: it is committed on its own, and the parent's answer waits for that commit
  (if it failed, the answer is dropped and the parent resumed again later). The
  result of a top-level call nobody waits for yet is written deferrable
  (`WRITE_DEFERRABLE`): it may commit with the next write, a submission often.
- a temporary status (and HTTP/network failures): retried after an exponential
  backoff with jitter; INCOMPATIBLE_STATE restarts the call from the input of its
  current run. The call's own policy (``Call.policy``, its function's, see
  `_limits`) chooses the statuses retried, the backoff and the attempts, else
  `EngineSettings.retry` does; its ``timeout`` bounds each attempt, and an attempt
  cut by it counts as a TIMEOUT answer. Before each attempt the function's
  concurrency and rate limits are asked (`_limits.Limits`): a call beyond them waits.
  Retries are bounded only for failures the function itself answered
  (see `RetryPolicy.max_attempts`): after that many in a row, the last answer is the
  call's result, so its caller receives the exception the function raised (a
  ``TimeoutError`` reaches the caller's ``except TimeoutError``). A function that
  could not be reached (connection refused, HTTP error, no response in time) is
  retried until the call expires: an application that is down or being redeployed
  loses no call.
- with the journal extension (see journal.proto), announced on every Run request when
  the store keeps segments: a Poll whose state is a ``dispatch_aio.v1.JournalDelta``
  appends its segment to the journal the store keeps for the call (one row, committed
  with the Poll), and the resume sends a ``JournalRef`` in its place. If the endpoint
  answers that it does not hold the run live (``dispatch_aio.JournalNeeded``), the same
  resume goes again at once with the whole journal, read back from the segments. Any
  other state is stored and echoed whole, as the protocol says.
- cancelled (`Engine.cancel`), the call and its unfinished descendants are DONE with a
  ``dispatch_aio.CancelledCallError``. A suspended call whose state is a journal of
  this SDK is first resumed once with the ``Dispatch-Aio-Cancel`` header, within a
  grace period: its endpoint raises ``CancelledError`` at the pending await, and the
  answer, whatever it is, is dropped.
- a call to the reserved function ``dispatch_aio.wait_event`` (see `_events`) is never
  run: it finishes with the outcome of its event once the event is resolved, or with
  STATUS_TIMEOUT at its expiration (the wait's timeout).
- past its expiration the call is DONE with STATUS_TIMEOUT. Calls without an
  expiration get `DEFAULT_EXPIRATION`; a child never outlives its parent's expiration.

With a store that several scheduler replicas share (`Store.coordination`), the engine
drives only the call trees of the partitions its replica holds a lease on (`_partitions`
keeps them): every write that drives a call carries the lease's fence, new calls are
announced to the replica holding their partition, and waits and cancellations of calls
driven elsewhere go through the store's wake-ups. Alone on its store, it drives every
call, as above.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from .._logs import ATTEMPT
from .._policy import RetryPolicy
from .._status import Status
from .._telemetry import SchedulerTelemetry, decode_carrier, encode_carrier
from ..errors import CancelledCallError
from ..proto.sdk.v1 import call_pb2, error_pb2, function_pb2, poll_pb2
from ..proto.v1 import journal_pb2
from ._attempts import record_attempt
from ._events import (
    EventAlreadyResolvedError,
    EventWaiters,
    event_key,
    event_key_problem,
    event_timeout_result,
)
from ._failures import log_failure
from ._invoker import Invoker, Outcome, Resume
from ._limits import Admission, CallPolicy, Limits, parse_policy, policy_problem
from ._partitions import Moved, Partitions, announce
from ._validate import call_problem
from .store import (
    WRITE_ALONE,
    WRITE_DEFERRABLE,
    WRITE_URGENT,
    AddAttempt,
    AddResult,
    AppendSegment,
    CallRecord,
    FencedError,
    InsertCall,
    KeyTakenError,
    Op,
    Phase,
    PruneIdempotencyKeys,
    PutEvent,
    PutIdempotencyKey,
    QueuedResult,
    RemovePollerResults,
    RemoveResults,
    RemoveSegments,
    StateKind,
    Store,
    StoreError,
    UpdateCall,
)

__all__ = [
    "DEFAULT_EXPIRATION",
    "DEFAULT_IDEMPOTENCY_RETENTION",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "Engine",
    "EngineClosedError",
    "EngineSettings",
    "EventAlreadyResolvedError",
    "InvalidCallError",
    "RetryPolicy",
    "is_cancelled",
]

logger = logging.getLogger("dispatch_aio.scheduler")

DEFAULT_EXPIRATION = 7 * 24 * 3600.0
"""Seconds a call may take when it does not set an expiration: 7 days, long enough for
durable sleeps of hours or days."""

DEFAULT_IDEMPOTENCY_RETENTION = 24 * 3600.0
"""Seconds an idempotency key is remembered after its submission: 24 hours."""
MAX_IDEMPOTENCY_KEY_LENGTH = 256
"""Longest idempotency key accepted, in characters."""

_MAX_RESULTS = 1000
_PRUNE_EVERY = 60.0  # seconds between two prunings of expired idempotency keys
_TYPE_PREFIX = "type.googleapis.com/"
_JOURNAL_URL = _TYPE_PREFIX + journal_pb2.Journal.DESCRIPTOR.full_name
_DELTA_URL = _TYPE_PREFIX + journal_pb2.JournalDelta.DESCRIPTOR.full_name
_REF_URL = _TYPE_PREFIX + journal_pb2.JournalRef.DESCRIPTOR.full_name
JOURNAL_NEEDED = "dispatch_aio.JournalNeeded"
"""Error type by which an endpoint asks for the whole journal (see journal.proto)."""
NONDETERMINISM = "NondeterminismError"
"""Error type by which an endpoint of this SDK reports that a run diverged from its
journal: with INCOMPATIBLE_STATE the call restarts from its input, with a permanent
status it ends (the function's divergence policy)."""
_TIMER_SLACK = 0.001  # fire timers a little late rather than early
# How long a child's finishing writes wait to be carried into its parent's resume before
# they are committed on their own: a slow resume does not keep a result at risk.
_CARRY_WAIT = 0.05


class InvalidCallError(ValueError):
    """A submitted call cannot be dispatched; the message says why."""


class EngineClosedError(RuntimeError):
    """The scheduler is shutting down and accepts no more calls."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Tunables of the engine."""

    default_expiration: float = DEFAULT_EXPIRATION
    """Seconds a call may take when it sets no expiration (or zero)."""
    max_expiration: float | None = None
    """Cap on any call's expiration, in seconds (None: no cap)."""
    request_timeout: float = 300.0
    """Seconds one Run request may take."""
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    default_endpoint: str = ""
    """Endpoint of submitted calls that name none (empty: they must name one)."""
    journal_delta: bool = True
    """Announce the journal extension to endpoints (used only with a store that keeps
    journal segments): endpoints of this SDK then send what is new in the journal, not
    all of it, at each round trip."""
    version_endpoints: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Endpoint of each application version (``Call.version``). A call that asks for a
    listed version runs at its endpoint, whatever endpoint it names; other calls run
    at their own. The calls a function makes, and its tail calls, keep its version
    unless they ask for another, so a call tree started on one version finishes there:
    an operator who deploys a changed application at a new address while the old one
    finishes its runs lists both versions here."""
    idempotency_retention: float = DEFAULT_IDEMPOTENCY_RETENTION
    """Seconds a submission's idempotency key is remembered: a submission with the same
    key within that time returns the first one's dispatch id and creates nothing."""
    cancel_grace: float = 10.0
    """Seconds a suspended call being cancelled is given to run its cleanup: it is
    resumed once with ``CancelledError`` raised at its pending await (endpoints of this
    SDK; others ignore the mark) and ends cancelled when that resume answers or this
    time is up. 0 ends it at once."""
    lease_timeout: float = 9.0
    """With a store that several replicas share (PostgreSQL): seconds after which the
    partitions of a replica that stopped renewing its leases (every third of this) go
    to the others."""


class _Live:
    """In-memory companion of an unfinished call."""

    __slots__ = (
        "attempt",
        "cancelling",
        "carried",
        "chained",
        "children",
        "event",
        "policy",
        "queue",
        "rec",
        "requesting",
        "running",
        "slot",
        "stall_until",
        "stalls",
        "task",
        "timer",
        "timer_at",
        "unreachable",
        "waiters",
        "writing",
    )

    def __init__(self, rec: CallRecord) -> None:
        self.rec = rec
        self.policy: CallPolicy | None = parse_policy(rec.policy)
        self.slot: tuple[str, str] | None = None  # the function whose slot the attempt holds
        self.event = event_key(rec)  # the key it waits on, if it waits for an event
        # Committed results of children, oldest first: (seq, result).
        self.queue: collections.deque[tuple[int, call_pb2.CallResult]] = collections.deque()
        self.running = False
        self.task: asyncio.Task[None] | None = None  # the attempt in flight
        self.requesting = False  # the attempt waits for the function's answer
        self.cancelling = False  # being cancelled: no further attempt starts
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.waiters: list[asyncio.Future[CallRecord]] = []
        self.stalls = 0  # consecutive attempts whose outcome could not be recorded
        # When the next attempt may start after a stall: computed once per stall, so that
        # the timer that reaches it starts the attempt instead of pushing it back again.
        self.stall_until = 0.0
        # Attempts since the last success that got no answer from the function. Kept
        # apart from `rec.failures`, which counts towards `max_attempts`; only the
        # backoff uses it, so losing it in a restart costs nothing.
        self.unreachable = 0
        self.attempt: AddAttempt | None = None  # the attempt whose outcome is being written
        # Children's finishing writes carried into this attempt's write (see `_Carried`),
        # then put into it (`take_attempt`) until it is committed (`committed`).
        self.carried: list[_Carried] = []
        self.writing: list[_Carried] = []
        # Unfinished children its Polls made in this process (not counted after a
        # restart: only whether it is 1 matters, to choose `_Chained` resumes).
        self.children = 0
        self.chained: _Chained | None = None  # its resume, sent with its child's request

    def take_attempt(self) -> list[Op]:
        """Return, once, the writes that go with the change an attempt's outcome makes.

        They are the attempt's record, if any, and the finishing writes of the children
        whose results the attempt was resumed with, when they are carried into it.
        """
        attempt, self.attempt = self.attempt, None
        carried, self.carried = self.carried, []
        ops: list[Op] = []
        for c in carried:
            c.written = True
            ops.extend(c.ops)
        self.writing.extend(carried)
        if attempt is not None:
            ops.append(attempt)
        return ops

    def committed(self) -> None:
        """Finish the children whose writes were committed with the attempt's."""
        writing, self.writing = self.writing, []
        for c in writing:
            c.settle(True)


class _Carried:
    """The writes finishing a child, carried into the write of its parent's resume.

    `outcome` is set by whoever writes them: True once committed, False if that write
    failed (`error`), None when the parent hands them back unwritten (the child then
    writes them itself).
    """

    __slots__ = ("error", "mine", "on_commit", "ops", "outcome", "seq", "taken", "written")

    def __init__(self, ops: list[Op], seq: int, on_commit: Callable[[], None]) -> None:
        self.ops = ops
        self.on_commit = on_commit  # run at once when the writes are committed
        self.seq = seq  # of the result in the parent's queue
        self.taken = False  # claimed by the parent's attempt or by the child itself
        self.mine = False  # claimed by the parent's attempt
        self.written = False  # put into a write by the parent's attempt
        self.outcome: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None

    def settle(self, outcome: bool | None, error: BaseException | None = None) -> None:
        if not self.outcome.done():
            self.error = error
            self.outcome.set_result(outcome)
            if outcome:
                self.on_commit()

    @property
    def committed(self) -> bool:
        return self.outcome.done() and self.outcome.result() is True


@dataclass(frozen=True, slots=True)
class _Chained:
    """A call's resume that went with its child's request (`Resume`), and its answer.

    The endpoint ran it with the child's result as the scheduler records it, so its
    answer stands for the very request the call's next attempt would send: the attempt
    takes it instead of sending, once it has checked that it has that request.
    """

    resume: bytes
    """The resume sent, without results (deterministic serialization)."""
    result: bytes
    """The child's CallResult it was resumed with (deterministic serialization)."""
    answer: asyncio.Future[Outcome | None]
    """Its answer, to come; None when the endpoint did not run it."""


class _Ids:
    """Dispatch ids: 12 hex digits of milliseconds, 4 of a counter, 16 random."""

    __slots__ = ("_count", "_last", "_pid", "_random", "_taken")

    def __init__(self) -> None:
        self._last = 0
        self._count = 0
        # Random bytes drawn from the OS for 64 ids at a time (one system call for many
        # ids), and drawn anew in a forked process, which must not repeat its parent's.
        self._random = b""
        self._taken = 0
        self._pid = 0

    def next(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms <= self._last:
            ms = self._last
            self._count += 1
            if self._count > 0xFFFF:
                ms += 1
                self._count = 0
        else:
            self._count = 0
        self._last = ms
        if self._taken == len(self._random) or self._pid != os.getpid():
            self._random, self._taken, self._pid = os.urandom(8 * 64), 0, os.getpid()
        bits = self._random[self._taken : self._taken + 8]
        self._taken += 8
        return f"{ms:012x}{self._count:04x}{bits.hex()}"


class Engine:
    """Runs calls: submissions, attempts, polls, results, retries and expiration.

    Args:
        store: Where every change is written before it takes effect.
        invoker: Sends the Run requests.
        settings: Tunables.
        rng: Source of the backoff jitter.
        clock: Wall clock (Unix seconds) for creation, expiration and due times.
    """

    def __init__(
        self,
        store: Store,
        invoker: Invoker,
        settings: EngineSettings | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._invoker = invoker
        self._settings = settings or EngineSettings()
        self._rng = rng or random.Random()
        self._clock = clock
        self._delta = self._settings.journal_delta and store.keeps_segments
        self._live: dict[str, _Live] = {}
        self._running: set[str] = set()  # ids of the calls with an attempt in flight
        self._limits: Limits[_Live] = Limits()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = _Ids()
        self._seq = 1
        # Results handed to their poller before their commit, by queue seq (`_finish`).
        self._carried: dict[int, _Carried] = {}
        self._closed = True
        # Idempotency keys of submissions being committed: a second submission with one
        # of them waits for the first rather than look it up before it is stored.
        self._keys_in_flight: dict[str, asyncio.Future[None]] = {}
        self._pruned_at = 0.0
        # With replicas sharing the store: the partitions this one drives.
        self._parts: Partitions | None = None
        self._events: EventWaiters[_Live] = EventWaiters()
        self._event_lookup: asyncio.Task[None] | None = None
        self._events_in_flight: dict[str, asyncio.Future[None]] = {}
        self._telemetry = SchedulerTelemetry()
        self.schedules_listener: Callable[[], None] | None = None
        """Called when another replica sharing the store changed the schedules."""

    @property
    def settings(self) -> EngineSettings:
        """The engine's tunables."""
        return self._settings

    async def start(self) -> None:
        """Load every unfinished call from the store and carry on with it.

        With a store that several replicas share, take a share of the partitions
        instead, and the unfinished calls of those.
        """
        coordination = self._store.coordination()
        if coordination is not None:
            self._parts = Partitions(self, coordination, self._settings.lease_timeout)
            self._closed = False
            try:
                await self._parts.start()
            except BaseException:
                self._closed = True
                self._parts = None
                raise
            return
        snapshot = await self._store.load()
        self._seq = snapshot.next_seq
        self._closed = False
        for rec in snapshot.calls:
            self._live[rec.id] = self._new_live(rec)
        stale: list[int] = []
        for queued in snapshot.results:
            poller = self._live.get(queued.poller_id)
            if poller is None or poller.rec.generation != queued.generation:
                stale.append(queued.seq)
            else:
                result = call_pb2.CallResult.FromString(queued.result)
                poller.queue.append((queued.seq, result))
        if stale:
            await self._store.write([RemoveResults(tuple(stale))])
        if self._live:
            logger.info("picking up %d unfinished calls", len(self._live))
        for live in list(self._live.values()):
            self._arm(live)

    async def close(self) -> None:
        """Stop every attempt and timer; unfinished calls stay in the store."""
        self._closed = True
        for live in self._live.values():
            if live.timer is not None:
                live.timer.cancel()
                live.timer = None
            for waiter in live.waiters:
                if not waiter.done():
                    waiter.set_exception(EngineClosedError("the scheduler is shutting down"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._parts is not None:
            parts, self._parts = self._parts, None
            await parts.stop()

    # Submissions and waiting.

    async def submit(
        self,
        calls: Sequence[call_pb2.Call],
        idempotency_keys: Sequence[str] = (),
        *,
        with_ops: Sequence[Op] = (),
        urgent: bool = False,
    ) -> list[str]:
        """Persist top-level calls atomically and start them.

        Args:
            calls: The calls.
            idempotency_keys: Empty, or one key per call ("" for a call without one).
                A call whose key was submitted within the retention period is not
                created again: its dispatch id is the first submission's.
            with_ops: More writes committed in the same transaction as the calls (a
                schedule's next firing time), even if every call existed already.
            urgent: A client in another process waits for the answer with nothing
                else to do (the scheduler API): the store may commit the calls on the
                loop's thread (`WRITE_URGENT`). Not for a submitter in this process,
                which shares the loop with the calls' runs that such a commit holds up.

        Returns:
            The dispatch ids, in the order of `calls`.

        Raises:
            InvalidCallError: A call or key is invalid; nothing was submitted.
            EngineClosedError: The engine is not running.
            StoreError: The calls could not be persisted; nothing was submitted.
        """
        if self._closed:
            raise EngineClosedError("the scheduler is not running")
        default = self._settings.default_endpoint
        problems = [
            problem
            for i, call in enumerate(calls)
            if (
                problem := call_problem(call, f"calls[{i}]", default_endpoint=default)
                or policy_problem(call, f"calls[{i}]")
            )
        ]
        keyed = _keyed(calls, idempotency_keys, problems)
        if problems:
            more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
            raise InvalidCallError("; ".join(problems[:3]) + more)
        if not keyed:
            return await self._create(calls, {}, with_ops=with_ops, urgent=urgent)
        while busy := [self._keys_in_flight[k] for k in keyed if k in self._keys_in_flight]:
            await asyncio.wait(busy)
        done = asyncio.get_running_loop().create_future()
        for key in keyed:
            self._keys_in_flight[key] = done
        try:
            keys = {i: k for k, i in keyed.items()}
            try:
                # Most keys are new (clients key every submission, for their retries):
                # the write that stores them finds any taken, with no lookup first.
                return await self._create(calls, keys, with_ops=with_ops, urgent=urgent)
            except KeyTakenError:
                pass  # submitted before: the calls found below are the answer
            for attempt in range(3):
                known = await self._store.find_idempotency_keys(list(keyed), self._clock())
                try:
                    return await self._create(calls, keys, known, with_ops=with_ops, urgent=urgent)
                except KeyTakenError:
                    # Another replica stored one of the keys meanwhile: its call is the
                    # answer, found at the next look.
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        finally:
            for key in keyed:
                del self._keys_in_flight[key]
            done.set_result(None)

    async def _create(
        self,
        calls: Sequence[call_pb2.Call],
        keys: Mapping[int, str],
        known: Mapping[str, str] | None = None,
        *,
        with_ops: Sequence[Op] = (),
        urgent: bool = False,
    ) -> list[str]:
        """Create the calls whose key (by index in `keys`) is not `known`; return all ids."""
        default = self._settings.default_endpoint
        known = known or {}
        now = self._clock()
        ids: list[str] = []
        records: list[CallRecord] = []
        ops: list[Op] = []
        for i, call in enumerate(calls):
            key = keys.get(i, "")
            if key in known:
                ids.append(known[key])
                continue
            dispatch_id = self._ids.next()
            ids.append(dispatch_id)
            rec = self._record(call, dispatch_id, dispatch_id, "", call.endpoint or default, now)
            records.append(rec)
            ops.append(InsertCall(rec))
            if key:
                expires = now + self._settings.idempotency_retention
                ops.append(PutIdempotencyKey(key, dispatch_id, expires, now))
        ops.extend(with_ops)
        if not ops:
            return ids
        if keys and now - self._pruned_at >= _PRUNE_EVERY:
            self._pruned_at = now
            ops.append(PruneIdempotencyKeys(now))
        if self._parts is None:
            await self._write_submission(ops, urgent)
            self._created(records)
            for rec in records:
                self._adopt(rec)
            return ids
        ops.extend(announce(records))
        submitting = self._parts.submitting
        submitting.update(rec.id for rec in records)  # their announcements: nothing to load
        try:
            await self._write_submission(ops, urgent)
        finally:
            submitting.difference_update(rec.id for rec in records)
        self._created(records)
        for rec in records:
            # Adopted already if it was loaded with its partition meanwhile.
            if self._parts.adoptable(rec.id) and self._parts.holds(rec.root_id):
                self._adopt(rec)
        return ids

    async def _write_submission(self, ops: list[Op], urgent: bool) -> None:
        """Write a submission, `WRITE_URGENT` if its client waits from afar."""
        # Set here, not around `submit`: the calls' attempt tasks would inherit it.
        token = WRITE_URGENT.set(urgent)
        try:
            await self._store.write(ops)
        finally:
            WRITE_URGENT.reset(token)

    async def wait(self, dispatch_id: str, max_seconds: float | None = None) -> CallRecord | None:
        """Wait until a call is done.

        Args:
            dispatch_id: The call.
            max_seconds: Seconds to wait at most (None: no limit).

        Returns:
            The call's record (DONE unless the timeout elapsed), or None if the
            scheduler has no such call.
        """
        live = self._live.get(dispatch_id)
        if live is None:
            if self._parts is not None:
                return await self._parts.wait(dispatch_id, max_seconds)
            return await self._store.get_call(dispatch_id)
        waiter: asyncio.Future[CallRecord] = asyncio.get_running_loop().create_future()
        live.waiters.append(waiter)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            async with asyncio.timeout(max_seconds):
                return await waiter
        except TimeoutError:
            return live.rec
        except Moved:  # its partition went to another replica: wait for it there
            assert self._parts is not None
            left = None if max_seconds is None else max_seconds - (loop.time() - began)
            return await self._parts.wait(dispatch_id, left)
        finally:
            if waiter in live.waiters:
                live.waiters.remove(waiter)

    async def cancel(self, dispatch_id: str) -> int | None:
        """Cancel a call and every unfinished call below it.

        Each ends DONE with STATUS_PERMANENT_ERROR and an error of type
        `errors.CancelledCallError.error_type`, which its parent receives like any
        result (a parent being cancelled with it receives nothing). A Run request in
        flight is abandoned; one whose answer is being recorded is let finish first.
        The call itself, if suspended with a journal of this SDK, is first resumed once
        with the cancellation mark, so that its ``finally:`` blocks run, and ends when
        that resume answers or `EngineSettings.cancel_grace` is up.

        Returns:
            The number of calls stopped, or None if the call had finished already.

        Raises:
            LookupError: No call has this id.
            EngineClosedError: The engine is not running.
            StoreError: The cancellation could not be persisted (some calls of the tree
                may be cancelled; cancelling again finishes the job).
        """
        if self._closed:
            raise EngineClosedError("the scheduler is not running")
        if dispatch_id not in self._live:
            if self._parts is not None:
                return await self._parts.cancel(dispatch_id)
            if await self._store.get_call(dispatch_id) is None:
                raise LookupError(f"no call with dispatch id {dispatch_id!r}")
            return None
        target = self._live[dispatch_id]
        if (
            self._settings.cancel_grace > 0
            and target.task is None
            and not target.cancelling
            and target.rec.phase is Phase.SUSPENDED
            and _journaled(target.rec)
        ):
            # Let it run its `finally:` blocks first; waited for below like an attempt
            # whose answer is being recorded, so the tree ends once it has answered.
            target.cancelling = True
            if target.timer is not None:
                target.timer.cancel()
                target.timer = None
            target.running = True
            self._running.add(target.rec.id)
            task = asyncio.get_running_loop().create_task(self._cancel_resume(target))
            target.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while True:
            tree = self._subtree(dispatch_id)
            for live in tree:
                live.cancelling = True
                if live.timer is not None:
                    live.timer.cancel()
                    live.timer = None
            busy = [live.task for live in tree if live.task is not None]
            if not busy:
                break
            for live in tree:
                if live.task is not None and live.requesting:
                    live.task.cancel()
            # An attempt recording its answer may add children: they are cancelled next.
            await asyncio.wait(busy)
        if not tree:
            return None  # it finished while its last attempt was let finish
        stopped = 0
        for live in tree:  # parents first: a cancelled parent takes no results
            if self._live.get(live.rec.id) is not live:
                continue
            rec = live.rec
            message = f"call {rec.id} ({rec.function}) was cancelled"
            if rec.id != dispatch_id:
                message += f" with the call {dispatch_id} above it"
            error = error_pb2.Error(type=CancelledCallError.error_type, message=message)
            await self._finish(
                live,
                Status.PERMANENT_ERROR,
                call_pb2.CallResult(error=error),
                message,
                [],
                attempted=False,
            )
            stopped += 1
        return stopped

    def _cancel_abandoned(self, poller_id: str, generation: int, outcome: Outcome) -> None:
        """Cancel the calls a run answered it no longer awaits (``abandoned_calls``)."""
        response = outcome.response
        if response is None:
            return
        directive = response.WhichOneof("directive")
        if directive == "poll":
            abandoned = set(response.poll.abandoned_calls)
        elif directive == "exit":
            abandoned = set(response.exit.abandoned_calls)
        else:
            return
        if not abandoned:
            return
        targets = [
            live.rec.id
            for live in self._live.values()
            if live.rec.parent_id == poller_id
            and live.rec.parent_generation == generation
            and live.rec.correlation_id in abandoned
        ]
        for dispatch_id in targets:
            logger.debug("call %s: cancelled, its caller %s abandoned it", dispatch_id, poller_id)
            task = asyncio.get_running_loop().create_task(self._cancel_quietly(dispatch_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _cancel_quietly(self, dispatch_id: str) -> None:
        try:
            await self.cancel(dispatch_id)
        except (LookupError, EngineClosedError):
            pass  # finished and forgotten, or the scheduler stops: nothing left to cancel
        except Exception as exc:
            log_failure(logger, exc, "call %s: its cancellation failed", dispatch_id)

    async def _cancel_resume(self, live: _Live) -> None:
        """Resume a suspended call being cancelled, marked so, within the grace period.

        Its answer is not recorded: the call ends cancelled whatever it answers (the
        calls of a Poll are never made, a result or error is dropped).
        """
        rec = live.rec
        try:
            request, delivered = self._request(live)
            # Results stay queued: they are dropped with the call, not consumed.
            live.queue.extendleft(reversed(delivered))
            del request.poll_result.results[:]
            deadline = min(self._clock() + self._settings.cancel_grace, rec.expires_at)
            grace = deadline - self._clock()
            async with asyncio.timeout(max(grace, 0.0)):
                outcome = await self._invoker.run(
                    self._endpoint(rec), request, grace, journal_delta=self._delta, cancel=True
                )
                if rec.state_kind is StateKind.SEGMENTS and _journal_needed(outcome):
                    segments = await self._store.read_segments(rec.id)
                    state = request.poll_result.typed_coroutine_state
                    state.type_url, state.value = _JOURNAL_URL, b"".join(segments)
                    left = deadline - self._clock()
                    outcome = await self._invoker.run(
                        self._endpoint(rec), request, left, journal_delta=self._delta, cancel=True
                    )
            logger.debug("call %s: cancelled, its resume answered %s", rec.id, _describe(outcome))
        except TimeoutError:
            logger.info(
                "call %s (%s): cancelled, and no answer within the grace period of %.3g s",
                rec.id,
                rec.function,
                self._settings.cancel_grace,
            )
        except Exception as exc:
            log_failure(logger, exc, "call %s: the resume that cancels it failed", rec.id)
        finally:
            live.running = False
            live.task = None
            self._running.discard(rec.id)

    # Durable events (see `_events`).

    async def send_event(self, key: str, result: call_pb2.CallResult) -> int:
        """Resolve a durable event: its waiters, now and later, receive `result`.

        The event is stored, and the calls waiting on it finish, in one transaction.

        Args:
            key: The event's key.
            result: The outcome: its ``output`` (the value) or its ``error``.

        Returns:
            The number of waiting calls that received the outcome.

        Raises:
            InvalidCallError: The key is invalid.
            EventAlreadyResolvedError: The key was resolved already; nothing changed.
            EngineClosedError: The engine is not running.
            StoreError: The event could not be stored; nothing changed.
        """
        if self._closed:
            raise EngineClosedError("the scheduler is not running")
        problem = event_key_problem(key)
        if problem is not None:
            raise InvalidCallError(problem)
        if not self._store.keeps_events:
            raise StoreError(f"{type(self._store).__name__} keeps no durable events")
        while (busy := self._events_in_flight.get(key)) is not None:
            await asyncio.wait([busy])
        done = asyncio.get_running_loop().create_future()
        self._events_in_flight[key] = done
        try:
            if await self._store.get_events([key]):
                raise EventAlreadyResolvedError(key)
            data = result.SerializeToString()
            try:
                woken = await self._wake(key, data, [PutEvent(key, data, self._clock())])
            except StoreError:
                # Another replica resolved it between the look-up and the write.
                if await self._store.get_events([key]):
                    raise EventAlreadyResolvedError(key) from None
                raise
            # Waiters made while the event was written looked it up too early.
            return woken + await self._wake(key, data)
        finally:
            del self._events_in_flight[key]
            done.set_result(None)

    async def _wake(self, key: str, data: bytes, ops: list[Op] | None = None) -> int:
        """Finish the idle waiters of `key` with the outcome `data`, writing `ops` with them."""
        ops = list(ops or [])
        waiters = [w for w in self._events.waiting(key) if not w.running and not w.cancelling]
        if not ops and not waiters:
            return 0
        result = call_pb2.CallResult.FromString(data)
        status = Status.OK if not result.HasField("error") else Status.PERMANENT_ERROR
        dones: list[Callable[[], None]] = []
        task = asyncio.current_task()
        for waiter in waiters:
            finish_ops, finish_done, _ = self._finishing(
                waiter, status, result, "" if status is Status.OK else "the event is an error",
                [], attempted=False,
            )  # fmt: skip
            ops.extend(finish_ops)
            dones.append(finish_done)
            # Busy until written: no expiry or second wake-up finishes it meanwhile, and
            # a cancellation waits for this task like for an attempt being recorded.
            waiter.running = True
            waiter.task = task
        try:
            await self._store.write(ops)
        finally:
            for waiter in waiters:
                waiter.running = False
                waiter.task = None
        for finish_done in dones:
            finish_done()
        return len(waiters)

    def _arm_event(self, live: _Live) -> None:
        """Register an event waiter and set the timer of its expiration (its timeout)."""
        key = live.event
        assert key is not None
        problem = event_key_problem(key)
        status = Status.INVALID_ARGUMENT
        if problem is None and not self._store.keeps_events:
            problem = f"this scheduler's store ({type(self._store).__name__}) keeps no events"
            status = Status.PERMANENT_ERROR
        if problem is not None:
            error = error_pb2.Error(type=status.proto_name, message=problem)
            self._start_task(live, self._end_wait(live, status, error))
            return
        if self._events.add(key, live) and self._event_lookup is None:
            self._event_lookup = asyncio.get_running_loop().create_task(self._look_up_events())
            self._tasks.add(self._event_lookup)
            self._event_lookup.add_done_callback(self._tasks.discard)
        rec = live.rec
        now = self._clock()
        when = max(rec.expires_at, live.stall_until)
        if when <= now:
            timeout = event_timeout_result(key, rec).error
            self._start_task(live, self._end_wait(live, Status.TIMEOUT, timeout))
        elif live.timer is None or live.timer_at != when:
            if live.timer is not None:
                live.timer.cancel()
            loop = asyncio.get_running_loop()
            live.timer = loop.call_later(when - now + _TIMER_SLACK, self._fire, live)
            live.timer_at = when

    def _start_task(self, live: _Live, work: Coroutine[Any, Any, None]) -> None:
        live.running = True
        task = asyncio.get_running_loop().create_task(work)
        live.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_wait(self, live: _Live, status: Status, error: error_pb2.Error) -> None:
        """Finish an event waiter without its event (timed out, invalid key)."""
        try:
            result = call_pb2.CallResult(error=error)
            await self._finish(live, status, result, error.message, [], attempted=False)
        except Exception as exc:
            live.stalls += 1
            live.stall_until = self._clock() + self._settings.retry.backoff(live.stalls, self._rng)
            log_failure(
                logger, exc, "call %s: the end of its event wait was not recorded", live.rec.id
            )
        finally:
            live.running = False
            live.task = None
        self._arm(live)

    def _event_resolved(self, key: str | None) -> None:
        """Look up an event resolved elsewhere (None: any awaited here) for its waiters."""
        self._events.recheck(self._events.keys() if key is None else [key])
        if self._events.unchecked and self._event_lookup is None and not self._closed:
            self._event_lookup = asyncio.get_running_loop().create_task(self._look_up_events())
            self._tasks.add(self._event_lookup)
            self._event_lookup.add_done_callback(self._tasks.discard)

    async def _look_up_events(self) -> None:
        """Deliver resolved events to their new waiters, looking keys up in batches."""
        failures = 0
        try:
            while self._events.unchecked and not self._closed:
                keys = self._events.take_unchecked()
                try:
                    found = await self._store.get_events(keys)
                    for key, data in found.items():
                        await self._wake(key, data)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    self._events.recheck(keys)
                    log_failure(logger, exc, "resolved events could not be looked up")
                    await asyncio.sleep(self._settings.retry.backoff(failures, self._rng))
        finally:
            self._event_lookup = None

    @property
    def event_waiters(self) -> int:
        """Number of calls waiting for an event."""
        return len(self._events)

    def _subtree(self, dispatch_id: str) -> list[_Live]:
        """Return the unfinished call and its unfinished descendants, parents first."""
        children: dict[str, list[_Live]] = {}
        for live in self._live.values():
            if live.rec.parent_id:
                children.setdefault(live.rec.parent_id, []).append(live)
        root = self._live.get(dispatch_id)
        found = [root] if root is not None else []
        ids = [dispatch_id]
        while ids:
            below = [child for i in ids for child in children.get(i, [])]
            found.extend(below)
            ids = [child.rec.id for child in below]
        return found

    def live_view(self, dispatch_id: str) -> tuple[bool, int] | None:
        """Return (running, queued results) of an unfinished call, or None."""
        live = self._live.get(dispatch_id)
        if live is None:
            return None
        return live.running, len(live.queue)

    @property
    def unfinished(self) -> int:
        """Number of calls not done yet."""
        return len(self._live)

    def running(self) -> list[str]:
        """Return the dispatch ids of the calls with a Run request in flight."""
        return list(self._running)

    # Scheduling.

    def _adopt(self, rec: CallRecord) -> None:
        live = self._new_live(rec)
        self._live[rec.id] = live
        self._arm(live)

    def _new_live(self, rec: CallRecord) -> _Live:
        live = _Live(rec)
        self._limits.learn(_function_key(rec), live.policy)
        self._telemetry.loaded(1)
        return live

    def _created(self, records: Sequence[CallRecord]) -> None:
        """Count calls whose creation was committed."""
        for rec in records:
            self._telemetry.created(rec.function)

    def _let_go(self, live: _Live) -> None:
        """Forget a call another replica drives from now on."""
        del self._live[live.rec.id]
        self._running.discard(live.rec.id)
        self._limits.forget(_function_key(live.rec), live)
        self._telemetry.let_go()
        if live.event is not None:
            self._events.discard(live.event, live)

    def _fence(self, rec: CallRecord) -> list[Op]:
        """The fence of a write driving `rec` when replicas share the store, else none."""
        return [] if self._parts is None else self._parts.fence(rec.root_id)

    def _arm(self, live: _Live) -> None:
        """Start the call's next attempt now, or set a timer for it."""
        rec = live.rec
        if self._closed or live.running or live.cancelling or rec.phase is Phase.DONE:
            return
        if self._parts is not None and self._parts.draining and not self._parts.holds(rec.root_id):
            return  # its partition is being let go
        if live.event is not None:
            self._arm_event(live)
            return
        now = self._clock()
        when: float | None
        if rec.phase is Phase.PENDING:
            when = rec.due_at if rec.due_at is not None else now
        elif (
            rec.failures == 0
            and not live.unreachable
            and (rec.poll_error or len(live.queue) >= rec.min_results)
        ):
            when = now
        else:
            when = rec.due_at
        if live.stall_until > now:
            when = live.stall_until if when is None else max(when, live.stall_until)
        if when is None or when > rec.expires_at:
            when = rec.expires_at
        if live.timer is not None:
            if when > now and when == live.timer_at:
                return  # already set (a poller re-armed by each child's result)
            live.timer.cancel()
            live.timer = None
        if when <= now:
            if self._admit(live, now):
                self._start(live)
        else:
            loop = asyncio.get_running_loop()
            live.timer = loop.call_later(when - now + _TIMER_SLACK, self._fire, live)
            live.timer_at = when

    def _admit(self, live: _Live, now: float) -> bool:
        """Take a slot of the call's function for its attempt, if it has limits.

        Returns False when the attempt must wait: queued for a slot (`_release` arms it
        again), or with a timer set for the next rate token.
        """
        key = _function_key(live.rec)
        if not self._limits.limited(key):
            return True
        starting = live.rec.phase is Phase.PENDING
        admission, delay = self._limits.admit(key, live, takes_token=starting, now=now)
        if admission is Admission.GO:
            live.slot = key
            return True
        if admission is Admission.LATER:
            loop = asyncio.get_running_loop()
            live.timer = loop.call_later(delay + _TIMER_SLACK, self._fire, live)
            live.timer_at = now + delay
        return False

    def _release(self, live: _Live) -> None:
        """Give back the slot the call's attempt held; start the calls waiting for it."""
        key, live.slot = live.slot, None
        if key is None:
            return
        for waiting in self._limits.release(key):
            if self._live.get(waiting.rec.id) is waiting:
                self._arm(waiting)

    def _fire(self, live: _Live) -> None:
        live.timer = None
        self._arm(live)

    def _start(self, live: _Live) -> None:
        live.running = True
        self._running.add(live.rec.id)
        task = asyncio.get_running_loop().create_task(self._attempt(live))
        live.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, live: _Live) -> None:
        delivered: list[tuple[int, call_pb2.CallResult]] = []
        carried: list[_Carried] = []
        slot: tuple[str, int] | None = None
        try:
            slot = await self._cluster_slot(live)
            rec = live.rec
            now = self._clock()
            if now >= rec.expires_at:
                WRITE_ALONE.set(len(self._tasks) == 1)
                await self._expire(live, [], attempted=False)
            else:
                request, delivered = self._request(live)
                carried = [c for s, _ in delivered if (c := self._carried.get(s)) is not None]
                timeout, limit = self._time_limit(live, now)
                ATTEMPT.set(rec.attempts + 1)  # this task's context: names the attempt
                started = now
                span = self._telemetry.attempt(
                    rec.function, rec.id, rec.attempts + 1, rec.trace_context, started
                )
                # The endpoint's run span goes under this attempt's span, or, when the
                # scheduler traces nothing, under the context the call was made in.
                carrier = span.carrier() or decode_carrier(rec.trace_context)
                request.trace_context.update(carrier)
                live.requesting = True  # until the answer: `cancel` may stop the request
                outcome = await self._chained_answer(live, request, delivered, timeout)
                if outcome is None:
                    outcome = await self._send(live, request, timeout)
                if rec.state_kind is StateKind.SEGMENTS and _journal_needed(outcome):
                    # The endpoint does not hold the run live (it restarted, another
                    # replica answered, the run was evicted): the whole journal goes.
                    segments = await self._store.read_segments(rec.id)
                    state = request.poll_result.typed_coroutine_state
                    state.type_url, state.value = _JOURNAL_URL, b"".join(segments)
                    # The same bound as the first send (the function's timeout included).
                    timeout = min(timeout, rec.expires_at - self._clock())
                    outcome = await self._invoker.run(
                        self._endpoint(rec), request, timeout, journal_delta=self._delta
                    )
                live.requesting = False
                if carried and not await self._take_carried(live, carried):
                    # Dropped: the results recorded go back; the others come back through
                    # their children.
                    live.queue.extendleft(reversed(_recorded(delivered, carried)))
                    delivered = []
                    self._telemetry.attempted(span, int(outcome.status), "", self._clock())
                else:
                    timed_out = (
                        limit is not None
                        and outcome.response is None
                        and outcome.status is Status.TIMEOUT
                    )
                    if timed_out:
                        outcome = Outcome(
                            Status.TIMEOUT,
                            error=f"the attempt outlived the function's timeout of {limit:.6g} s",
                        )
                    # Written with the change the outcome makes (see `_Live.take_attempt`).
                    ended = self._clock()
                    live.attempt = record_attempt(rec.id, rec.attempts + 1, started, ended, outcome)
                    self._telemetry.attempted(
                        span, live.attempt.attempt.status, outcome.error, ended
                    )
                    # Set in this task's own context, checked just before the write: with
                    # no other attempt in flight, the loop has nothing to do until it returns.
                    # The children whose writes it carries only wait for it.
                    WRITE_ALONE.set(len(self._tasks) == 1 + len(live.carried))
                    generation = rec.generation
                    if not await self._handle(live, outcome, delivered, counted=timed_out):
                        live.queue.extendleft(reversed(delivered))
                    delivered = []
                    for c in carried:
                        if c.mine:
                            c.settle(True if c.written else None)
                    self._cancel_abandoned(rec.id, generation, outcome)
            live.stalls = 0
            live.stall_until = 0.0
        except asyncio.CancelledError as exc:
            _settle_failed(carried, exc)
            raise
        except FencedError as exc:
            _settle_failed(carried, exc)
            if self._parts is None:
                raise
            self._parts.fenced(live)  # drops the call: `_arm` leaves it alone
        except Exception as exc:
            _settle_failed(carried, exc)
            live.stalls += 1
            live.stall_until = self._clock() + self._settings.retry.backoff(live.stalls, self._rng)
            log_failure(
                logger, exc, "call %s: the outcome of an attempt was not recorded", live.rec.id
            )
            live.queue.extendleft(reversed(_recorded(delivered, carried)))
        finally:
            live.running = False
            live.requesting = False
            live.attempt = None
            live.carried = []
            live.writing = []
            live.task = None
            self._running.discard(live.rec.id)
            self._release(live)
            if slot is not None and self._parts is not None:
                self._parts.give_slot(*slot)
        self._arm(live)

    def _time_limit(self, live: _Live, now: float) -> tuple[float, float | None]:
        """Seconds an attempt of `live` may take, and its function's timeout if that binds."""
        limit = min(self._settings.request_timeout, live.rec.expires_at - now)
        timeout = live.policy.timeout if live.policy is not None else None
        if timeout is not None and timeout < limit:
            return timeout, timeout
        return limit, None

    async def _chained_answer(
        self,
        live: _Live,
        request: function_pb2.RunRequest,
        delivered: list[tuple[int, call_pb2.CallResult]],
        time_limit: float,
    ) -> Outcome | None:
        """The answer to `request` that came with a child's, if any (see `_Chained`)."""
        chained, live.chained = live.chained, None
        if (
            chained is None
            or len(delivered) != 1
            or delivered[0][1].SerializeToString(deterministic=True) != chained.result
        ):
            return None
        sent = function_pb2.RunRequest()
        sent.CopyFrom(request)
        del sent.poll_result.results[:]
        if sent.SerializeToString(deterministic=True) != chained.resume:
            return None
        done, _ = await asyncio.wait((chained.answer,), timeout=max(time_limit, 0.001))
        if not done:
            return Outcome(Status.TIMEOUT, error=f"no response within {time_limit:.3g} s")
        return chained.answer.result()  # None: not run, the request goes now

    async def _send(
        self, live: _Live, request: function_pb2.RunRequest, time_limit: float
    ) -> Outcome:
        """Send an attempt's request, with its parent's resume when that may save one."""
        rec = live.rec
        parent = self._chain_parent(live)
        if parent is None:
            return await self._invoker.run(
                self._endpoint(rec), request, time_limit, journal_delta=self._delta
            )
        resume, _ = self._request(parent)  # its queue is empty: it takes no result
        # As its attempt would send it (no attempt span: `_chain_parent`).
        resume.trace_context.update(decode_carrier(parent.rec.trace_context))
        then = Resume(
            resume.SerializeToString(deterministic=True),
            rec.correlation_id,
            parent.rec.attempts + 1,
            max(self._time_limit(parent, self._clock())[0], 0.001),
        )
        outcome = await self._invoker.run(
            self._endpoint(rec), request, time_limit, journal_delta=self._delta, then=then
        )
        response = outcome.response
        if (
            outcome.resumed is not None
            and response is not None
            and outcome.status is Status.OK
            and response.WhichOneof("directive") == "exit"
            and not response.exit.HasField("tail_call")
            and self._live.get(rec.parent_id) is parent
        ):
            # The result as `_finishing` records it, and as the endpoint resumed with.
            result = call_pb2.CallResult()
            result.CopyFrom(response.exit.result)
            result.correlation_id = rec.correlation_id
            result.dispatch_id = rec.id
            parent.chained = _Chained(
                then.request, result.SerializeToString(deterministic=True), outcome.resumed
            )
        return outcome

    def _chain_parent(self, live: _Live) -> _Live | None:
        """The parent whose resume may go with `live`'s request (see `Resume`), if any.

        One that waits for this child's result and nothing else, at the same endpoint
        (one that takes batches: not one in this process), with its journal kept here
        (its resume names it by a JournalRef), and whose resume is not traced (its
        attempt span would change the request).
        """
        rec = live.rec
        parent = self._live.get(rec.parent_id) if rec.parent_id else None
        if (
            parent is None
            or parent.children != 1
            or parent.rec.generation != rec.parent_generation
            or parent.rec.phase is not Phase.SUSPENDED
            or parent.rec.state_kind is not StateKind.SEGMENTS
            or parent.queue
            or parent.running
            or parent.cancelling
            or parent.rec.failures
            or parent.unreachable
            or parent.rec.poll_error
            or parent.rec.due_at is not None
            or parent.event is not None
            or self._endpoint(parent.rec) != self._endpoint(rec)
            or not self._invoker.takes_resumes(self._endpoint(rec))
            or self._telemetry.traces()
        ):
            return None
        return parent

    async def _take_carried(self, live: _Live, carried: list[_Carried]) -> bool:
        """Take the children's writes carried to this attempt into its own write.

        Those a child is writing itself (the resume was slow) are waited for. Returns
        False if one of them failed: the attempt's answer acted on a result that was
        never recorded, so it is dropped, and the writes taken are handed back to their
        children. The next resume sends the state kept before this attempt; an endpoint
        holding the run live past it replays it (this SDK's endpoint sees that the
        `JournalRef` names a round it has left behind).
        """
        mine = []
        for c in carried:
            if not c.taken:
                c.taken = c.mine = True
                mine.append(c)
        live.carried = mine
        theirs = [c.outcome for c in carried if not c.mine]
        if not theirs or all(await asyncio.gather(*map(asyncio.shield, theirs))):
            return True
        live.carried = []
        for c in mine:
            c.settle(None)
        logger.info(
            "call %s: its answer is dropped, it was resumed with a result that could not "
            "be recorded; it is resumed again once that call has run again",
            live.rec.id,
        )
        return False

    async def _cluster_slot(self, live: _Live) -> tuple[str, int] | None:
        """With replicas, wait for one of the function's slots across all of them.

        The local limit (`_admit`) counts this replica's attempts; this one the
        replicas' together. Returns the slot taken, or None when none is needed.
        """
        limit = live.policy.concurrency if live.policy is not None else None
        if self._parts is None or limit is None or live.slot is None:
            return None
        function = " ".join(live.slot)
        live.requesting = True  # a cancellation may stop the wait
        try:
            return function, await self._parts.take_slot(function, limit)
        finally:
            live.requesting = False

    def _endpoint(self, rec: CallRecord) -> str:
        """Where to run a call: its version's endpoint, if listed, else its own."""
        if rec.version:
            return self._settings.version_endpoints.get(rec.version, rec.endpoint)
        return rec.endpoint

    def _request(
        self, live: _Live
    ) -> tuple[function_pb2.RunRequest, list[tuple[int, call_pb2.CallResult]]]:
        rec = live.rec
        request = function_pb2.RunRequest(
            function=rec.function,
            dispatch_id=rec.id,
            parent_dispatch_id=rec.parent_id,
            root_dispatch_id=rec.root_id,
            generation=rec.generation,
        )
        request.creation_time.FromNanoseconds(round(rec.created_at * 1e9))
        request.expiration_time.FromNanoseconds(round(rec.expires_at * 1e9))
        delivered: list[tuple[int, call_pb2.CallResult]] = []
        if rec.phase is Phase.SUSPENDED:
            poll_result = request.poll_result
            poll_result.SetInParent()
            if rec.state_kind is StateKind.BYTES:
                poll_result.coroutine_state = rec.state
            elif rec.state_kind in (StateKind.TYPED, StateKind.SEGMENTS):
                poll_result.typed_coroutine_state.SetInParent()
                poll_result.typed_coroutine_state.MergeFromString(rec.state)
            count = min(rec.max_results, len(live.queue))
            delivered = [live.queue.popleft() for _ in range(count)]
            poll_result.results.extend(result for _, result in delivered)
            if rec.poll_error:
                poll_result.error.MergeFromString(rec.poll_error)
        else:
            request.input.SetInParent()
            if rec.input:
                request.input.MergeFromString(rec.input)
        return request, delivered

    # Outcomes. Each returns True when the delivered results were consumed.

    async def _handle(
        self,
        live: _Live,
        outcome: Outcome,
        delivered: list[tuple[int, call_pb2.CallResult]],
        *,
        counted: bool = False,
    ) -> bool:
        rec = live.rec
        now = self._clock()
        response = outcome.response
        if response is not None:
            directive = response.WhichOneof("directive")
            if directive == "exit" and response.exit.HasField("tail_call"):
                await self._tail_call(live, response, delivered, now)
                return True
            if directive == "poll" and outcome.status in (Status.OK, Status.UNSPECIFIED):
                kept = _kept_state(rec, response.poll)
                if now >= rec.expires_at:
                    await self._expire(live, delivered)
                    return True
                if not isinstance(kept, str):
                    await self._poll(live, response.poll, kept, delivered, now)
                    return True
                # Retried, the endpoint gets the whole journal and its delta fits it.
                outcome, response = Outcome(Status.INVALID_RESPONSE, error=kept), None
            elif directive == "exit" and outcome.status is Status.OK:
                await self._finish(live, Status.OK, response.exit.result, "", delivered)
                return True
            elif directive is None and outcome.status is Status.OK:
                outcome = Outcome(
                    Status.INVALID_RESPONSE,
                    error="the RunResponse has status OK but neither exit nor poll",
                )
        status = outcome.status
        failure = _describe(outcome)
        retry = self._retry(live)
        diverged = _diverged(outcome)
        if diverged is not None:
            self._report_divergence(rec, status, diverged)
        unanswered = response is None and not counted
        if (
            status is Status.INCOMPATIBLE_STATE
            or (unanswered and status.temporary)
            or (not unanswered and retry.retries(status))
        ):
            if now >= rec.expires_at:
                await self._expire(live, delivered, failure)
                return True
            failures = rec.failures
            if unanswered:
                live.unreachable += 1
            else:
                failures += 1
                if retry.max_attempts and failures >= retry.max_attempts:
                    failure = f"gave up after {failures} failed attempts; the last one: {failure}"
                    # The function's own answer, so the caller gets the exception it raised.
                    await self._finish(
                        live,
                        status,
                        _exit_result(outcome),
                        failure,
                        delivered,
                        diverged=diverged is not None,
                    )
                    return True
            due = now + retry.backoff(failures + live.unreachable, self._rng)
            if status is Status.INCOMPATIBLE_STATE:
                await self._restart(
                    live, delivered, failures, due, failure, now, diverged=diverged is not None
                )
                return True
            logger.debug("call %s: attempt failed (%s), retrying", rec.id, failure)
            new = rec._replace(
                due_at=due,
                attempts=rec.attempts + 1,
                failures=failures,
                status=int(status),
                last_error=failure,
                updated_at=now,
            )
            await self._store.write([*self._fence(rec), UpdateCall(new), *live.take_attempt()])
            live.committed()
            live.rec = new
            return False
        await self._finish(
            live, status, _exit_result(outcome), failure, delivered, diverged=diverged is not None
        )
        return True

    def _retry(self, live: _Live) -> RetryPolicy:
        """The retry policy of a call: its function's, else the scheduler's."""
        policy = live.policy
        if policy is not None and policy.retry is not None:
            return policy.retry
        return self._settings.retry

    def _report_divergence(self, rec: CallRecord, status: Status, report: str) -> None:
        what = (
            "restarts from its input"
            if status is Status.INCOMPATIBLE_STATE
            else f"ends with {status.name}"
        )
        logger.warning(
            "call %s (%s) diverged from its journal (divergence %d; the call %s): %s",
            rec.id,
            rec.function,
            rec.divergences + 1,
            what,
            report,
        )

    async def _poll(
        self,
        live: _Live,
        poll: poll_pb2.Poll,
        kept: tuple[StateKind, bytes, list[Op]],
        delivered: list[tuple[int, call_pb2.CallResult]],
        now: float,
    ) -> None:
        rec = live.rec
        problem = None
        for i, call in enumerate(poll.calls):
            problem = call_problem(
                call, f"calls[{i}]", default_endpoint=rec.endpoint
            ) or policy_problem(call, f"calls[{i}]")
            if problem is not None:
                break
        children: list[CallRecord] = []
        poll_error = b""
        if problem is None:
            for call in poll.calls:
                children.append(
                    self._record(
                        call,
                        self._ids.next(),
                        rec.root_id,
                        rec.id,
                        call.endpoint or rec.endpoint,
                        now,
                        parent=rec,
                    )
                )
        else:
            problem = f"the Poll's calls were not dispatched: {problem}"
            logger.info("call %s: %s", rec.id, problem)
            error = error_pb2.Error(type=Status.INVALID_ARGUMENT.proto_name, message=problem)
            poll_error = error.SerializeToString()
        state_kind, state, journal_ops = kept
        max_wait = poll.max_wait.ToNanoseconds() / 1e9 if poll.HasField("max_wait") else 0.0
        new = rec._replace(
            phase=Phase.SUSPENDED,
            state_kind=state_kind,
            state=state,
            min_results=min(max(poll.min_results, 1), _MAX_RESULTS),
            max_results=min(max(poll.max_results, 1), _MAX_RESULTS),
            due_at=now + max_wait if max_wait > 0 else None,
            poll_error=poll_error,
            attempts=rec.attempts + 1,
            failures=0,
            polls=rec.polls + 1,
            status=int(Status.OK),
            last_error=problem or "",
            updated_at=now,
        )
        ops: list[Op] = self._fence(rec)
        ops.extend(InsertCall(c) for c in children)
        ops.extend(journal_ops)
        ops.append(UpdateCall(new))
        ops.extend(live.take_attempt())
        if delivered:
            ops.append(RemoveResults(tuple(seq for seq, _ in delivered)))
        await self._store.write(ops)
        live.committed()
        # A first run (or a run started anew) has no children of its own yet.
        live.children = len(children) + (live.children if rec.phase is Phase.SUSPENDED else 0)
        live.rec = new
        live.unreachable = 0
        self._created(children)
        for child in children:
            self._adopt(child)

    async def _tail_call(
        self,
        live: _Live,
        response: function_pb2.RunResponse,
        delivered: list[tuple[int, call_pb2.CallResult]],
        now: float,
    ) -> None:
        rec = live.rec
        tail = response.exit.tail_call
        problem = call_problem(tail, "tail_call", default_endpoint=rec.endpoint) or policy_problem(
            tail, "tail_call"
        )
        if problem is not None:
            failure = f"the function answered an invalid tail call: {problem}"
            await self._finish(live, Status.INVALID_ARGUMENT, None, failure, delivered)
            return
        logger.debug("call %s: tail call to %s", rec.id, tail.function)
        new = _fresh_run(rec)._replace(
            endpoint=tail.endpoint or rec.endpoint,
            function=tail.function,
            version=tail.version or rec.version,
            input=tail.input.SerializeToString() if tail.HasField("input") else b"",
            policy=tail.policy.SerializeToString() if tail.HasField("policy") else b"",
            due_at=None,
            attempts=rec.attempts + 1,
            failures=0,
            status=response.status,
            last_error="",
            updated_at=now,
        )
        await self._replace_run(live, new, delivered)
        live.unreachable = 0
        live.policy = parse_policy(new.policy)
        self._limits.learn(_function_key(new), live.policy)

    async def _restart(
        self,
        live: _Live,
        delivered: list[tuple[int, call_pb2.CallResult]],
        failures: int,
        due: float,
        failure: str,
        now: float,
        *,
        diverged: bool = False,
    ) -> None:
        rec = live.rec
        if not diverged:  # a divergence was reported with its report
            logger.info("call %s: incompatible state, restarting from its input", rec.id)
        new = _fresh_run(rec)._replace(
            divergences=rec.divergences + int(diverged),
            due_at=due,
            attempts=rec.attempts + 1,
            failures=failures,
            status=int(Status.INCOMPATIBLE_STATE),
            last_error=failure,
            updated_at=now,
        )
        await self._replace_run(live, new, delivered)

    async def _replace_run(
        self, live: _Live, new: CallRecord, delivered: list[tuple[int, call_pb2.CallResult]]
    ) -> None:
        ops: list[Op] = [*self._fence(new), UpdateCall(new), *live.take_attempt()]
        if live.queue or delivered:
            ops.append(RemovePollerResults(new.id))
        if live.rec.state_kind is StateKind.SEGMENTS:
            ops.append(RemoveSegments(new.id))
        await self._store.write(ops)
        live.committed()
        live.rec = new
        live.queue.clear()

    async def _expire(
        self,
        live: _Live,
        delivered: list[tuple[int, call_pb2.CallResult]],
        last: str = "",
        *,
        attempted: bool = True,
    ) -> None:
        rec = live.rec
        failure = (
            f"the call expired: it did not finish within {rec.expires_at - rec.created_at:.6g} s"
        )
        last = last or rec.last_error
        if last:
            failure += f" (last attempt: {last})"
        await self._finish(live, Status.TIMEOUT, None, failure, delivered, attempted=attempted)

    async def _finish(
        self,
        live: _Live,
        status: Status,
        result: call_pb2.CallResult | None,
        failure: str,
        delivered: list[tuple[int, call_pb2.CallResult]],
        *,
        attempted: bool = True,
        diverged: bool = False,
    ) -> None:
        ops, done, delivery = self._finishing(
            live, status, result, failure, delivered, attempted=attempted, diverged=diverged
        )
        parent = self._made_ready(live.rec, delivery)
        if parent is None or delivery is None:
            # A top-level call's result nobody asked for yet may commit with the next
            # write (a submission, often) rather than alone.
            token = WRITE_DEFERRABLE.set(not live.rec.parent_id and not live.waiters)
            try:
                await self._store.write(ops)
            finally:
                WRITE_DEFERRABLE.reset(token)
            done()
            return
        # The parent is resumed now, and these writes go with its own (`_take_carried`).
        seq = delivery[0]
        carried = self._carried[seq] = _Carried(ops, seq, lambda: done(delivered=True))
        parent.queue.append(delivery)
        self._arm(parent)
        try:
            if not parent.running:  # held back (its function's limits): nothing to ride on
                parent.queue.remove(delivery)
                carried.taken = True
                await self._store.write(ops)
                done()
                return
            await asyncio.wait([carried.outcome], timeout=_CARRY_WAIT)
            if not carried.taken:  # a slow resume: the result is committed on its own
                carried.taken = True
                WRITE_ALONE.set(False)  # the parent's attempt is in flight
                try:
                    await self._store.write(ops)
                except BaseException as exc:
                    carried.settle(False, exc)  # the parent's answer, if any, is dropped
                    if delivery in parent.queue:  # not handed over yet: it never will be
                        parent.queue.remove(delivery)
                    raise
                carried.settle(True)
            committed = await asyncio.shield(carried.outcome)
        finally:
            del self._carried[seq]
        if committed is None:  # handed back unwritten: write it, then hand the result over
            await self._store.write(ops)
            done()
            return
        if not committed:
            if delivery in parent.queue:
                parent.queue.remove(delivery)
            assert carried.error is not None
            raise carried.error

    def _made_ready(
        self, rec: CallRecord, delivery: tuple[int, call_pb2.CallResult] | None
    ) -> _Live | None:
        """The parent that `delivery`, a result for it, makes ready to resume now, if any."""
        if delivery is None:
            return None
        parent = self._live.get(rec.parent_id)
        if (
            parent is None
            or parent.rec.generation != rec.parent_generation
            or parent.rec.phase is not Phase.SUSPENDED
            or parent.running
            or parent.cancelling
            or parent.rec.failures
            or parent.unreachable
            or parent.stall_until > self._clock()
            or parent.rec.expires_at <= self._clock()
            or not parent.rec.min_results <= len(parent.queue) + 1 <= parent.rec.max_results
        ):
            return None
        return parent

    def _finishing(
        self,
        live: _Live,
        status: Status,
        result: call_pb2.CallResult | None,
        failure: str,
        delivered: list[tuple[int, call_pb2.CallResult]],
        *,
        attempted: bool = True,
        diverged: bool = False,
    ) -> tuple[list[Op], Callable[..., None], tuple[int, call_pb2.CallResult] | None]:
        """Return the writes finishing a call, what to do after their commit, its result.

        The result is the one queued for its parent (seq and result), if any. Called
        after the commit, ``done()`` hands that result to the parent, unless
        ``done(delivered=True)`` says it was handed over already.
        """
        rec = live.rec
        now = self._clock()
        final = call_pb2.CallResult()
        if result is not None:
            final.CopyFrom(result)
        final.correlation_id = rec.correlation_id
        final.dispatch_id = rec.id
        if status is not Status.OK and not final.HasField("error"):
            if not failure or failure == f"status {status.name}":
                message = f"function {rec.function!r} ended with status {status.name}, no error"
            else:
                message = f"function {rec.function!r}: {failure}"
            final.error.CopyFrom(error_pb2.Error(type=status.proto_name, message=message))
        data = final.SerializeToString()
        new = rec._replace(
            phase=Phase.DONE,
            due_at=None,
            state_kind=StateKind.NONE,
            state=b"",
            poll_error=b"",
            attempts=rec.attempts + int(attempted),
            divergences=rec.divergences + int(diverged),
            status=int(status),
            last_error=failure,
            result=data,
            updated_at=now,
            finished_at=now,
        )
        ops: list[Op] = [*self._fence(rec), UpdateCall(new), *live.take_attempt()]
        if live.queue or delivered:
            ops.append(RemovePollerResults(rec.id))
        if rec.state_kind is StateKind.SEGMENTS:
            ops.append(RemoveSegments(rec.id))
        parent = self._live.get(rec.parent_id) if rec.parent_id else None
        seq = 0
        if parent is not None and parent.rec.generation == rec.parent_generation:
            seq = self._seq
            self._seq += 1
            if self._parts is not None:
                seq = self._parts.seq(seq, rec.root_id)
            ops.append(AddResult(QueuedResult(seq, parent.rec.id, rec.parent_generation, data)))

        def done(*, delivered: bool = False) -> None:
            live.committed()  # the children whose writes went with these first
            live.rec = new
            live.queue.clear()
            del self._live[rec.id]
            caller = self._live.get(rec.parent_id) if rec.parent_id else None
            if caller is not None and caller.rec.generation == rec.parent_generation:
                caller.children = max(caller.children - 1, 0)
            if self._parts is not None:
                self._parts.ended(rec.id)
            self._limits.forget(_function_key(rec), live)
            self._telemetry.let_go()
            self._telemetry.finished(
                rec.function,
                rec.id,
                rec.trace_context,
                int(status),
                final.error.message,
                rec.created_at,
                now,
            )
            if live.event is not None:
                self._events.discard(live.event, live)
            if live.timer is not None:
                live.timer.cancel()
                live.timer = None
            if status is Status.OK:
                logger.debug("call %s (%s) succeeded", rec.id, rec.function)
            else:
                logger.info("call %s (%s) failed: %s", rec.id, rec.function, final.error.message)
            for waiter in live.waiters:
                if not waiter.done():
                    waiter.set_result(new)
            live.waiters.clear()
            if delivered:
                return
            # The parent may have moved on while the write was in flight.
            parent = self._live.get(rec.parent_id) if seq else None
            if parent is not None and parent.rec.generation == rec.parent_generation:
                parent.queue.append((seq, final))
                self._arm(parent)

        return ops, done, (seq, final) if seq else None

    # Records.

    def _record(
        self,
        call: call_pb2.Call,
        dispatch_id: str,
        root_id: str,
        parent_id: str,
        endpoint: str,
        now: float,
        *,
        parent: CallRecord | None = None,
    ) -> CallRecord:
        seconds = self._settings.default_expiration
        if call.HasField("expiration"):
            requested = call.expiration.ToNanoseconds() / 1e9
            if requested > 0:
                seconds = requested
        if self._settings.max_expiration is not None:
            seconds = min(seconds, self._settings.max_expiration)
        expires_at = now + seconds
        if parent is not None:
            expires_at = min(expires_at, parent.expires_at)
        return CallRecord(
            id=dispatch_id,
            root_id=root_id,
            parent_id=parent_id,
            correlation_id=call.correlation_id if parent is not None else 0,
            parent_generation=parent.generation if parent is not None else 0,
            endpoint=endpoint,
            function=call.function,
            input=call.input.SerializeToString() if call.HasField("input") else b"",
            version=call.version or (parent.version if parent is not None else ""),
            policy=call.policy.SerializeToString() if call.HasField("policy") else b"",
            trace_context=encode_carrier(call.trace_context),
            created_at=now,
            expires_at=expires_at,
            phase=Phase.PENDING,
            updated_at=now,
        )


def _recorded(
    delivered: list[tuple[int, call_pb2.CallResult]], carried: list[_Carried]
) -> list[tuple[int, call_pb2.CallResult]]:
    """The results of `delivered` that are committed: not carried, or carried and written.

    The others go back to their parent through their children (`Engine._finish`).
    """
    lost = {c.seq for c in carried if not c.committed}
    return [d for d in delivered if d[0] not in lost] if lost else delivered


def _settle_failed(carried: list[_Carried], error: BaseException) -> None:
    """Settle the carried writes an attempt took, when it ends with `error`."""
    for c in carried:
        if c.mine:
            c.settle(False if c.written else None, error)


def _function_key(rec: CallRecord) -> tuple[str, str]:
    """The function a call runs, whose concurrency and rate limits it shares."""
    return rec.endpoint, rec.function


def is_cancelled(rec: CallRecord) -> bool:
    """Whether a call ended by being cancelled (`Engine.cancel`)."""
    if rec.phase is not Phase.DONE or rec.status != Status.PERMANENT_ERROR:
        return False
    try:
        result = call_pb2.CallResult.FromString(rec.result)
    except DecodeError:
        return False
    return result.error.type == CancelledCallError.error_type


def _keyed(
    calls: Sequence[call_pb2.Call], keys: Sequence[str], problems: list[str]
) -> dict[str, int]:
    """Return the index of the call of each idempotency key; add what is wrong to `problems`."""
    if not keys:
        return {}
    if len(keys) != len(calls):
        problems.append(
            f"{len(keys)} idempotency keys for {len(calls)} calls: give one per call, "
            "an empty one for a call without a key"
        )
        return {}
    keyed: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not key:
            continue
        if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH or not key.isprintable():
            problems.append(
                f"calls[{i}]: invalid idempotency key {key[:40]!r}: use at most "
                f"{MAX_IDEMPOTENCY_KEY_LENGTH} printable characters"
            )
        elif key in keyed:
            problems.append(
                f"calls[{keyed[key]}] and calls[{i}] have the same idempotency key {key!r}: "
                "give each call of a request its own key"
            )
        else:
            keyed[key] = i
    return keyed


def _fresh_run(rec: CallRecord) -> CallRecord:
    """Return `rec` reset to start a new run of the same call (restart or tail call)."""
    return rec._replace(
        phase=Phase.PENDING,
        generation=rec.generation + 1,
        state_kind=StateKind.NONE,
        state=b"",
        poll_error=b"",
        min_results=1,
        max_results=1,
    )


def _kept_state(rec: CallRecord, poll: poll_pb2.Poll) -> tuple[StateKind, bytes, list[Op]] | str:
    """Return how to keep a Poll's state: kind, `state` column and journal operations.

    A JournalDelta is appended to the journal kept for the call, which it must
    continue (same run, next round); when it does not, the problem is returned.
    """
    member = poll.WhichOneof("state")
    drop: list[Op] = [RemoveSegments(rec.id)] if rec.state_kind is StateKind.SEGMENTS else []
    if member == "coroutine_state":
        return StateKind.BYTES, poll.coroutine_state, drop
    if member != "typed_coroutine_state":
        return StateKind.NONE, b"", drop
    state = poll.typed_coroutine_state
    if state.type_url != _DELTA_URL:
        return StateKind.TYPED, state.SerializeToString(), drop
    try:
        delta = journal_pb2.JournalDelta.FromString(state.value)
    except DecodeError as exc:
        return f"the Poll's JournalDelta cannot be decoded: {exc}"
    ops: list[Op]
    if delta.polls_before == 0:
        ops = drop  # a new journal
    elif rec.state_kind is StateKind.SEGMENTS:
        ref = journal_pb2.JournalRef.FromString(any_pb2.Any.FromString(rec.state).value)
        if ref.run_id != delta.run_id or ref.polls != delta.polls_before:
            return (
                f"the Poll's JournalDelta continues round {delta.polls_before} of run "
                f"{delta.run_id.hex()}, but the scheduler keeps round {ref.polls} of run "
                f"{ref.run_id.hex()}"
            )
        ops = []
    else:
        # The whole journal went last (the plain protocol, or a cache miss): it becomes
        # the first segment.
        whole = any_pb2.Any.FromString(rec.state) if rec.state_kind is StateKind.TYPED else None
        if whole is None or whole.type_url != _JOURNAL_URL:
            return "the Poll's JournalDelta continues a journal the scheduler does not have"
        try:
            journal = journal_pb2.Journal.FromString(whole.value)
        except DecodeError:
            journal = journal_pb2.Journal()
        if journal.run_id != delta.run_id or journal.polls != delta.polls_before:
            return (
                f"the Poll's JournalDelta continues round {delta.polls_before} of run "
                f"{delta.run_id.hex()}, but the journal sent was round {journal.polls} of "
                f"run {journal.run_id.hex()}"
            )
        ops = [AppendSegment(rec.id, journal.polls, whole.value)]
    ops.append(AppendSegment(rec.id, delta.polls, delta.segment))
    ref = journal_pb2.JournalRef(run_id=delta.run_id, polls=delta.polls, tag=delta.tag)
    kept = any_pb2.Any(type_url=_REF_URL, value=ref.SerializeToString())
    return StateKind.SEGMENTS, kept.SerializeToString(), ops


def _journaled(rec: CallRecord) -> bool:
    """Whether a suspended call's state is a journal of this SDK.

    Only endpoints of this SDK take the cancellation mark: others would resume the call
    as if nothing happened.
    """
    if rec.state_kind is StateKind.SEGMENTS:
        return True
    if rec.state_kind is not StateKind.TYPED:
        return False
    state = any_pb2.Any()
    try:
        state.MergeFromString(rec.state)
    except DecodeError:
        return False
    return state.type_url == _JOURNAL_URL


def _journal_needed(outcome: Outcome) -> bool:
    """Whether the endpoint asks for the whole journal instead of a JournalRef."""
    result = _exit_result(outcome)
    return (
        outcome.status is Status.INCOMPATIBLE_STATE
        and result is not None
        and result.error.type == JOURNAL_NEEDED
    )


def _diverged(outcome: Outcome) -> str | None:
    """The divergence report an endpoint answered with, if it did."""
    result = _exit_result(outcome)
    if result is None or result.error.type != NONDETERMINISM:
        return None
    return result.error.message.partition("\nRaised in the remote function:")[0]


def _exit_result(outcome: Outcome) -> call_pb2.CallResult | None:
    response = outcome.response
    if response is not None and response.WhichOneof("directive") == "exit":
        return response.exit.result
    return None


def _describe(outcome: Outcome) -> str:
    """One line saying what an unsuccessful attempt produced."""
    if outcome.response is None:
        return outcome.error or outcome.status.name
    text = f"status {outcome.status.name}"
    result = _exit_result(outcome)
    if result is not None and result.HasField("error"):
        error = result.error
        text += f": {error.type}: {error.message}" if error.type else f": {error.message}"
    return text
