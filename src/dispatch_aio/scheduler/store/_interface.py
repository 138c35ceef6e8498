"""Storage interface of the scheduler: call records, queued results and write operations.

The engine keeps every unfinished call in memory and writes each change through a
`Store`. A write is a list of operations applied atomically: when `Store.write`
returns, all of them are durable; when it raises, none of them happened. Nothing the
scheduler acknowledges or sends depends on a write that has not returned.

Reads serve the start-up recovery (`Store.load`) and the inspection service; the
engine never reads on its hot path. It reads a call's journal segments
(`Store.read_segments`) only when an endpoint no longer holds the run live.

The engine tells a store, through the context variable `WRITE_ALONE`, when a write is
the only thing the scheduler has in flight: a store that hands writes to a thread may
then commit it on the calling thread instead, since the event loop has nothing else to
do meanwhile. It is a hint about cost only: what a write guarantees is the same.

Through `WRITE_URGENT`, it tells a store that a client in another process waits for a
small write (a submission through the API) while other work may be in flight, none of
it in the caller's way: a store that hands writes to a thread
may commit it on the calling thread all the same when no other write is committing or
has just committed (a single client submitting one call after another), and groups it
with the others otherwise (many clients at once).

Through `WRITE_DEFERRABLE`, it tells a store that nobody waits for a write yet (a
top-level call finished, its result not asked for): a store that groups writes may
hold it back for up to `DEFER_MAX` seconds, so that it commits with the next write
rather than alone. It still returns only once committed.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._coordination import Coordination

__all__ = [
    "DEFER_MAX",
    "WRITE_ALONE",
    "WRITE_DEFERRABLE",
    "WRITE_URGENT",
    "AddAttempt",
    "AddResult",
    "Announce",
    "AppendSegment",
    "AttemptRecord",
    "CallQuery",
    "CallRecord",
    "DeleteSchedule",
    "Fence",
    "FencedError",
    "InsertCall",
    "KeyTakenError",
    "MoveSchedule",
    "Op",
    "Phase",
    "PruneIdempotencyKeys",
    "PutEvent",
    "PutIdempotencyKey",
    "PutSchedule",
    "QueuedResult",
    "RemovePollerResults",
    "RemoveResults",
    "RemoveSegments",
    "ScheduleRecord",
    "SetMeta",
    "Snapshot",
    "StateKind",
    "Store",
    "StoreError",
    "StoreInUseError",
    "UpdateCall",
    "answer_writers",
    "without_delivered",
]


WRITE_ALONE = contextvars.ContextVar("dispatch_aio_scheduler_write_alone", default=False)
"""True while the engine writes with no other attempt in flight (see the module docstring)."""

WRITE_URGENT = contextvars.ContextVar("dispatch_aio_scheduler_write_urgent", default=False)
"""True while the engine writes what a client waits for from afar (see the module docstring)."""

WRITE_DEFERRABLE = contextvars.ContextVar("dispatch_aio_scheduler_write_deferrable", default=False)
"""True while the engine writes what nobody waits for yet (see the module docstring)."""

DEFER_MAX = 0.005
"""Seconds a store may hold back a deferrable write, waiting for another to group it with."""


def answer_writers(
    futures: Sequence[asyncio.Future[None]], outcomes: Sequence[StoreError | None]
) -> None:
    """Answer the writers of one transaction, each with its own outcome (stores' helper)."""
    for future, outcome in zip(futures, outcomes, strict=True):
        if future.done():
            continue
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)


class StoreError(Exception):
    """The store could not read or write (disk full, locked or corrupt database ...)."""

    # Shown in tracebacks: the public name, not this private module's.
    __module__ = "dispatch_aio.scheduler"


class StoreInUseError(StoreError):
    """Another process uses the database (another scheduler runs on it)."""

    __module__ = "dispatch_aio.scheduler"


class FencedError(StoreError):
    """The write's partition is held by another scheduler replica: nothing was written.

    The replica that got it lost its lease on the partition (see `Fence`) and must stop
    driving the partition's calls.
    """


class KeyTakenError(StoreError):
    """A `PutIdempotencyKey` met the live key of another call: nothing was written.

    Another scheduler sharing the store took the key at the same time; the submission
    is answered with that call instead.
    """


class Phase(enum.IntEnum):
    """Where a call is, as stored. Values match `dispatch_aio.v1.CallState`.

    A call being run is still stored as PENDING (first run, retry) or SUSPENDED
    (resume): an attempt in flight is not recorded, it is simply made again after a
    restart.
    """

    PENDING = 1
    """Waiting to be run from its input, at `due_at` (now when unset)."""
    SUSPENDED = 3
    """Polled: waits for results of its children, or for `due_at` (max_wait)."""
    DONE = 4
    """Finished; `result` is final."""


class StateKind(enum.IntEnum):
    """Which member of the Poll `state` oneof the function sent (echoed exactly)."""

    NONE = 0
    BYTES = 1
    """The deprecated `coroutine_state` bytes."""
    TYPED = 2
    """`typed_coroutine_state`, stored as the serialized Any."""
    SEGMENTS = 3
    """A dispatch_aio journal kept by the scheduler (the journal extension): its
    segments are stored apart (`AppendSegment`), and `state` is the serialized Any of
    the `dispatch_aio.v1.JournalRef` that a resume sends in its place."""


class CallRecord(NamedTuple):
    """Everything the scheduler knows about one call.

    Records are immutable: the engine makes a changed copy (`_replace`), writes it, and
    only then uses it. A named tuple rather than a frozen dataclass: the engine makes
    one or two per attempt, and a tuple is made or copied about five times faster.
    """

    id: str
    """The dispatch id."""
    root_id: str
    """Dispatch id of the call tree's root (the call's own id for a top-level call)."""
    parent_id: str
    """Dispatch id of the poller that made this call; empty for a top-level call."""
    correlation_id: int
    """The parent's correlation id (uint64), echoed in the result delivered to it."""
    parent_generation: int
    """The parent's generation when it made the call; results of older generations
    (before a restart or a tail call of the parent) are not delivered."""
    endpoint: str
    function: str
    input: bytes
    """Serialized google.protobuf.Any of the current run's input."""
    version: str
    created_at: float
    """Unix seconds; not reset by a tail call."""
    expires_at: float
    """Unix seconds after which the call fails with STATUS_TIMEOUT."""
    phase: Phase
    updated_at: float
    generation: int = 0
    """Incremented by each restart (INCOMPATIBLE_STATE) and tail call."""
    due_at: float | None = None
    """PENDING: when to run (backoff). SUSPENDED: when max_wait elapses, or when a
    failed resume is retried."""
    state_kind: StateKind = StateKind.NONE
    state: bytes = b""
    min_results: int = 1
    max_results: int = 1
    poll_error: bytes = b""
    """Serialized Error to deliver in the next resume (the last Poll was rejected)."""
    attempts: int = 0
    """Run requests answered (or failed) so far."""
    failures: int = 0
    """Consecutive temporary answers from the function (attempts that reached no function
    are not counted); drives the backoff and `RetryPolicy.max_attempts`, reset by any
    success."""
    polls: int = 0
    status: int = 0
    """Final Status when DONE; otherwise the status of the last attempt."""
    last_error: str = ""
    result: bytes = b""
    """Serialized CallResult when DONE."""
    finished_at: float | None = None
    divergences: int = 0
    """Runs of the call that diverged from their journal (answered with a
    ``NondeterminismError``): restarted from the input, or the call's end."""
    policy: bytes = b""
    """Serialized ``dispatch_aio.v1.FunctionPolicy`` of the current run's function (from
    ``Call.policy``); empty when the call carries none."""
    trace_context: str = ""
    """The trace context the call was made in (``Call.trace_context``), as W3C
    ``traceparent`` and ``tracestate`` on two lines; empty when untraced."""


@dataclass(frozen=True, slots=True)
class QueuedResult:
    """A child's result waiting in its poller's queue."""

    seq: int
    """Store-wide increasing number: queue order, and the key to remove it."""
    poller_id: str
    generation: int
    """The poller's generation the result is for; a restarted or tail-called poller
    never sees results meant for an earlier generation."""
    result: bytes
    """Serialized CallResult, with the parent's correlation id."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the engine needs to pick up after a start: every unfinished call."""

    calls: list[CallRecord]
    results: list[QueuedResult]
    """Queued results, in `seq` order (results for finished pollers or earlier
    generations may be among them: the engine drops those)."""
    next_seq: int
    """A `QueuedResult.seq` greater than any stored one."""


@dataclass(frozen=True, slots=True)
class CallQuery:
    """Filter and page of `Store.list_calls`; all conditions must hold."""

    phases: tuple[Phase, ...] = ()
    """Empty: any phase."""
    statuses: tuple[int, ...] = ()
    """Only DONE calls with one of these final statuses (empty: no filter)."""
    root_id: str = ""
    parent_id: str | None = None
    """"" selects top-level calls."""
    after: int = 0
    """Only calls created after the one with this creation number (paging)."""
    before: int = 0
    """Only calls created before the one with this creation number (0: no bound)."""
    newest_first: bool = False
    """List the newest calls first (paging back with `before`)."""
    limit: int | None = None


# Write operations. A store applies the operations of one `write` atomically, in order.


@dataclass(frozen=True, slots=True)
class InsertCall:
    """Create a call."""

    record: CallRecord


@dataclass(frozen=True, slots=True)
class UpdateCall:
    """Replace the mutable fields of an existing call with those of `record`."""

    record: CallRecord


@dataclass(frozen=True, slots=True)
class AddResult:
    """Queue a child's result for its poller."""

    result: QueuedResult


@dataclass(frozen=True, slots=True)
class RemoveResults:
    """Remove delivered results from a queue."""

    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RemovePollerResults:
    """Drop every queued result of a poller (it finished, restarted or tail-called)."""

    poller_id: str


@dataclass(frozen=True, slots=True)
class AppendSegment:
    """Append a segment to a call's journal (`StateKind.SEGMENTS`)."""

    call_id: str
    polls: int
    """The journal's round count once the segment is appended; orders the segments."""
    data: bytes


@dataclass(frozen=True, slots=True)
class RemoveSegments:
    """Drop a call's journal segments (its run ended, restarted or handed over)."""

    call_id: str


@dataclass(frozen=True, slots=True)
class SetMeta:
    """Set a scheduler-wide value (the signing key ...)."""

    key: str
    value: bytes
    keep: bool = False
    """Keep the value already stored, if any (schedulers starting together on one
    database each make a key: the first one stored wins)."""


@dataclass(frozen=True, slots=True)
class PutIdempotencyKey:
    """Remember that a submission with idempotency key `key` created call `dispatch_id`.

    A key stored for the same call, or expired, is replaced. A key still live for another
    call fails the whole write with `KeyTakenError`, writing nothing: the submission was
    made before (or, with replicas, by another scheduler meanwhile), and its first call
    is the answer. So the write itself checks a new key, with no lookup before it.
    """

    key: str
    dispatch_id: str
    expires_at: float
    """Unix seconds after which the key is forgotten."""
    now: float | None = None
    """The submission's time, which a stored key's expiry is compared with (None: the
    store's clock). PostgreSQL always uses its own clock."""


@dataclass(frozen=True, slots=True)
class PruneIdempotencyKeys:
    """Forget the idempotency keys that expired before `before` (Unix seconds)."""

    before: float


@dataclass(frozen=True, slots=True)
class Fence:
    """Apply the write only if `replica` still holds `partition`'s lease at `epoch`.

    Checked in the write's own transaction: when another replica took the partition
    over, the write fails with `FencedError` and none of its operations is applied. A
    store that serves a single scheduler ignores it.
    """

    partition: int
    replica: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Announce:
    """Once the write commits, tell the replica holding `partition` of new calls in it.

    A store that serves a single scheduler ignores it.
    """

    partition: int
    dispatch_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PutEvent:
    """Resolve a durable event: keep its outcome under its key, once.

    The engine checks that the key is not resolved yet before it writes; a store
    refuses (raises `StoreError` for the whole write) a key that is.
    """

    key: str
    result: bytes
    """Serialized CallResult: the output or the error every waiter receives."""
    resolved_at: float
    """Unix seconds."""


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A schedule: what to call, and when it fires next."""

    id: str
    spec: bytes
    """Serialized ``dispatch_aio.v1.Schedule``: the function, its input, the cron
    expression or interval and the policy for missed firings."""
    next_at: float
    """Unix seconds of the next firing not made yet."""
    paused: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class PutSchedule:
    """Create a schedule, or replace the one with the same id."""

    record: ScheduleRecord


@dataclass(frozen=True, slots=True)
class MoveSchedule:
    """Move a schedule's next firing to `next_at`, never back (nothing if it is gone).

    What a firing writes: it leaves the rest of the row (a pause, a new definition made
    meanwhile by another replica) as it is.
    """

    schedule_id: str
    next_at: float


@dataclass(frozen=True, slots=True)
class DeleteSchedule:
    """Delete a schedule (nothing if there is none)."""

    schedule_id: str


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One Run attempt of a call and its outcome, for `calls`/`show`."""

    call_id: str
    number: int
    """1 for the call's first attempt."""
    started_at: float
    finished_at: float
    status: int
    """The status the attempt ended with (OK for a run that suspended)."""
    outcome: str
    """What happened, in words (see `scheduler._attempts.describe`)."""


@dataclass(frozen=True, slots=True)
class AddAttempt:
    """Record an attempt of a call (written with the change it made to the call)."""

    attempt: AttemptRecord


Op = (
    InsertCall
    | UpdateCall
    | AddResult
    | RemoveResults
    | RemovePollerResults
    | SetMeta
    | AppendSegment
    | RemoveSegments
    | PutIdempotencyKey
    | PruneIdempotencyKeys
    | Fence
    | Announce
    | PutEvent
    | PutSchedule
    | MoveSchedule
    | DeleteSchedule
    | AddAttempt
)


class Store(abc.ABC):
    """Durable storage of the scheduler.

    Implementations must make each `write` atomic and durable before returning, and
    should group concurrent writes into shared transactions: the engine issues many
    small writes concurrently and waits for each.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open (and create or migrate) the storage."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the storage."""

    @abc.abstractmethod
    async def write(self, ops: Sequence[Op]) -> None:
        """Apply `ops` atomically and durably.

        The operations are captured when this is called: later changes by the
        caller do not affect them.

        Raises:
            StoreError: Nothing was written.
        """

    @abc.abstractmethod
    async def load(self) -> Snapshot:
        """Return every unfinished call and the queued results of their pollers."""

    @abc.abstractmethod
    async def get_call(self, dispatch_id: str) -> CallRecord | None:
        """Return a call by dispatch id, or None if there is none."""

    @abc.abstractmethod
    async def list_calls(self, query: CallQuery) -> list[tuple[int, CallRecord]]:
        """Return matching calls in creation order, each with its creation number."""

    @abc.abstractmethod
    async def count_children(self, dispatch_ids: Sequence[str]) -> dict[str, int]:
        """Return the number of direct children of each given call (absent: none)."""

    @abc.abstractmethod
    async def get_meta(self, key: str) -> bytes | None:
        """Return a scheduler-wide value set with `SetMeta`, or None."""

    async def find_idempotency_keys(self, keys: Sequence[str], now: float) -> dict[str, str]:
        """Return the dispatch id of each of `keys` stored and not expired at `now`.

        Raises:
            StoreError: The store cannot read them, or keeps none.
        """
        raise StoreError(f"{type(self).__name__} keeps no idempotency keys")

    @property
    def keeps_events(self) -> bool:
        """Whether the store keeps durable events and schedules (`PutEvent`, `PutSchedule`).

        The scheduler offers events and schedules only with a store that does.
        """
        return False

    async def get_events(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Return the outcome (serialized CallResult) of each of `keys` resolved.

        Raises:
            StoreError: The store cannot read them, or keeps no events.
        """
        raise StoreError(f"{type(self).__name__} keeps no durable events")

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Return every schedule, oldest first.

        Raises:
            StoreError: The store cannot read them, or keeps no schedules.
        """
        raise StoreError(f"{type(self).__name__} keeps no schedules")

    @property
    def keeps_segments(self) -> bool:
        """Whether the store keeps journal segments (`AppendSegment`, `read_segments`).

        The engine uses the journal extension only with a store that does.
        """
        return False

    def coordination(self) -> Coordination | None:
        """Return how scheduler replicas share this store, or None if one runs alone.

        A store that several schedulers may use at once (PostgreSQL) returns the
        leases, loads by partition and wake-ups they coordinate through.
        """
        return None

    async def read_segments(self, dispatch_id: str) -> list[bytes]:
        """Return a call's journal segments in order (empty if it has none).

        Raises:
            StoreError: The store cannot read them, or keeps none.
        """
        raise StoreError(f"{type(self).__name__} keeps no journal segments")

    async def list_attempts(self, dispatch_id: str) -> list[AttemptRecord]:
        """Return the attempts recorded for a call, oldest first (none: an empty list)."""
        return []


def without_delivered(ops: Sequence[Op]) -> Sequence[Op]:
    """`ops` without the results they queue and then remove (stores' helper).

    A child's result delivered to its caller in the write that queues it (every step of
    a chain of awaits) need not be written, blob and all, only to be deleted. A removal
    made before the result is queued stays; with a seq queued twice, `ops` go as they
    are (and fail).
    """
    added: dict[int, int] = {}  # seq: the index of the op queuing it
    gone: set[int] = set()
    for i, op in enumerate(ops):
        if isinstance(op, AddResult):
            if op.result.seq in added:
                return ops
            added[op.result.seq] = i
        elif isinstance(op, RemoveResults):
            gone.update(seq for seq in op.seqs if seq in added)
    if not gone:
        return ops
    kept: list[Op] = []
    for i, op in enumerate(ops):
        if isinstance(op, AddResult) and op.result.seq in gone:
            continue
        if isinstance(op, RemoveResults):
            left = tuple(seq for seq in op.seqs if seq not in gone or i < added[seq])
            if left:
                kept.append(RemoveResults(left))
            continue
        kept.append(op)
    return kept
