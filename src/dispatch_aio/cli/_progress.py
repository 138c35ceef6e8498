"""Progress of the calls of a local scheduler, as the command shows it.

`TrackingStore` wraps the scheduler's store and tells a `CallTracker` about every
change once it is committed: the tracker counts calls by state and reports each
finished top-level call. Which calls are running (a Run request in flight) is known
only to the scheduler's engine; `Progress` asks the engine for the set it keeps (a
cost that does not grow with the number of calls) while the status line is drawn.
"""

from __future__ import annotations

__all__ = [
    "CallTracker",
    "Counts",
    "Progress",
    "TrackingStore",
    "finished_line",
]

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import any_pb2

from .._status import Status
from ..proto.sdk.v1 import call_pb2
from ..scheduler import Store
from ..scheduler.store import (
    AttemptRecord,
    CallQuery,
    CallRecord,
    Coordination,
    Handlers,
    InsertCall,
    Leases,
    Op,
    Phase,
    ScheduleRecord,
    Snapshot,
    UpdateCall,
)
from ._console import Console, Style
from ._format import describe_input, describe_result, format_duration, plural, shorten

logger = logging.getLogger(__name__)

_REFRESH = 0.25  # seconds between redraws of the status line
_RUNNING_EVERY = 2  # redraws between two questions about running calls
# Finished-call lines per second at most: past that, a burst is one line that counts it
# (thousands of lines a second are read by no one, and their formatting is most of the
# scheduler's work per call).
_LINES_PER_SECOND = 20


@dataclass(frozen=True, slots=True)
class Counts:
    """Number of calls in each state (done and failed: since the scheduler started)."""

    pending: int = 0
    running: int = 0
    suspended: int = 0
    done: int = 0
    failed: int = 0
    retrying: int = 0
    """Calls whose last attempt failed, waiting for the next one (not in the others)."""

    @property
    def unfinished(self) -> int:
        """Calls not finished yet."""
        return self.pending + self.running + self.suspended + self.retrying


class CallTracker:
    """Follows the calls of a scheduler from the changes its store commits.

    Args:
        on_finished: Called with the record of each top-level call that finishes.
    """

    def __init__(self, on_finished: Callable[[CallRecord], None] | None = None) -> None:
        self._phases: dict[str, Phase] = {}
        self._by_phase = {Phase.PENDING: 0, Phase.SUSPENDED: 0}
        self._done = 0
        self._failed = 0
        self._running: frozenset[str] = frozenset()
        # Unfinished calls whose last attempt failed (retrying): (attempts seen, failures
        # in a row).
        self._failures: dict[str, tuple[int, int]] = {}
        self.on_finished = on_finished
        self.on_retry: Callable[[CallRecord, int], None] | None = None
        """Called with a call whose attempt failed and is retried, and the failures in a row."""

    def counts(self) -> Counts:
        """Return the current counts."""
        running = {Phase.PENDING: 0, Phase.SUSPENDED: 0}
        for dispatch_id in self._running:
            phase = self._phases.get(dispatch_id)
            if phase is not None:
                running[phase] += 1
        retrying = {Phase.PENDING: 0, Phase.SUSPENDED: 0}
        for dispatch_id in self._failures.keys() - self._running:
            retrying[self._phases[dispatch_id]] += 1
        return Counts(
            pending=self._by_phase[Phase.PENDING]
            - running[Phase.PENDING]
            - retrying[Phase.PENDING],
            running=running[Phase.PENDING] + running[Phase.SUSPENDED],
            suspended=(
                self._by_phase[Phase.SUSPENDED]
                - running[Phase.SUSPENDED]
                - retrying[Phase.SUSPENDED]
            ),
            done=self._done,
            failed=self._failed,
            retrying=retrying[Phase.PENDING] + retrying[Phase.SUSPENDED],
        )

    def set_running(self, dispatch_ids: Sequence[str]) -> None:
        """Record which calls have a Run request in flight (as the scheduler said)."""
        self._running = frozenset(dispatch_ids)

    def loaded(self, snapshot: Snapshot) -> None:
        """Take the unfinished calls a starting scheduler loaded."""
        for rec in snapshot.calls:
            self._update(rec)

    def applied(self, ops: Sequence[Op]) -> None:
        """Take the changes of a committed write."""
        for op in ops:
            if isinstance(op, InsertCall | UpdateCall):
                self._update(op.record)

    def _update(self, rec: CallRecord) -> None:
        old = self._phases.pop(rec.id, None)
        if old is not None:
            self._by_phase[old] -= 1
        if rec.phase is not Phase.DONE:
            self._phases[rec.id] = rec.phase
            self._by_phase[rec.phase] += 1
            if rec.last_error and rec.status not in (Status.OK, Status.UNSPECIFIED):
                self._failed_attempt(rec)
            else:
                self._failures.pop(rec.id, None)
            return
        self._failures.pop(rec.id, None)
        if old is None:
            return  # already counted as finished
        if rec.status == Status.OK:
            self._done += 1
        else:
            self._failed += 1
        if not rec.parent_id and self.on_finished is not None:
            try:
                self.on_finished(rec)
            except Exception:
                logger.exception("cannot report the end of call %s", rec.id)

    def _failed_attempt(self, rec: CallRecord) -> None:
        seen, in_a_row = self._failures.setdefault(rec.id, (0, 0))
        if rec.attempts <= seen:
            return  # the same failure, written again with another change
        self._failures[rec.id] = (rec.attempts, in_a_row + 1)
        if self.on_retry is not None:
            try:
                self.on_retry(rec, in_a_row + 1)
            except Exception:
                logger.exception("cannot report the retry of call %s", rec.id)


class TrackingStore(Store):
    """A `Store` that reports every committed change to a `CallTracker`.

    Args:
        inner: The store that keeps the data.
        tracker: Told about each change once `inner` committed it.
    """

    def __init__(self, inner: Store, tracker: CallTracker) -> None:
        self._inner = inner
        self._tracker = tracker

    async def open(self) -> None:
        """Open the inner store."""
        await self._inner.open()

    async def close(self) -> None:
        """Close the inner store."""
        await self._inner.close()

    async def write(self, ops: Sequence[Op]) -> None:
        """Write through the inner store, then report the changes."""
        ops = list(ops)
        await self._inner.write(ops)
        self._tracker.applied(ops)

    async def load(self) -> Snapshot:
        """Load from the inner store and report the unfinished calls."""
        snapshot = await self._inner.load()
        self._tracker.loaded(snapshot)
        return snapshot

    async def get_call(self, dispatch_id: str) -> CallRecord | None:
        """Read a call from the inner store."""
        return await self._inner.get_call(dispatch_id)

    async def list_calls(self, query: CallQuery) -> list[tuple[int, CallRecord]]:
        """List calls from the inner store."""
        return await self._inner.list_calls(query)

    async def count_children(self, dispatch_ids: Sequence[str]) -> dict[str, int]:
        """Count children in the inner store."""
        return await self._inner.count_children(dispatch_ids)

    async def find_idempotency_keys(self, keys: Sequence[str], now: float) -> dict[str, str]:
        """Look idempotency keys up in the inner store."""
        return await self._inner.find_idempotency_keys(keys, now)

    async def get_meta(self, key: str) -> bytes | None:
        """Read a scheduler-wide value from the inner store."""
        return await self._inner.get_meta(key)

    async def list_attempts(self, dispatch_id: str) -> list[AttemptRecord]:
        """Read a call's attempts from the inner store."""
        return await self._inner.list_attempts(dispatch_id)

    @property
    def keeps_events(self) -> bool:
        """Whether the inner store keeps events and schedules."""
        return self._inner.keeps_events

    async def get_events(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Look resolved events up in the inner store."""
        return await self._inner.get_events(keys)

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Read the schedules from the inner store."""
        return await self._inner.list_schedules()

    @property
    def keeps_segments(self) -> bool:
        """Whether the inner store keeps journal segments."""
        return self._inner.keeps_segments

    async def read_segments(self, dispatch_id: str) -> list[bytes]:
        """Read a call's journal segments from the inner store."""
        return await self._inner.read_segments(dispatch_id)

    def coordination(self) -> Coordination | None:
        """The inner store's coordination of replicas; its loads are reported too."""
        inner = self._inner.coordination()
        return None if inner is None else _TrackingCoordination(inner, self._tracker)


class _TrackingCoordination(Coordination):
    """A `Coordination` that reports the calls a replica loads to a `CallTracker`."""

    def __init__(self, inner: Coordination, tracker: CallTracker) -> None:
        self._inner = inner
        self._tracker = tracker

    @property
    def replica(self) -> str:
        """The inner coordination's replica name."""
        return self._inner.replica

    async def start(self, handlers: Handlers, lease_timeout: float) -> None:
        """Start the inner coordination."""
        await self._inner.start(handlers, lease_timeout)

    async def stop(self) -> None:
        """Stop the inner coordination."""
        await self._inner.stop()

    async def renew(self) -> Leases:
        """Renew through the inner coordination."""
        return await self._inner.renew()

    async def claim(self, partitions: Sequence[int]) -> dict[int, int]:
        """Claim through the inner coordination."""
        return await self._inner.claim(partitions)

    async def release(self, partitions: Sequence[int]) -> None:
        """Release through the inner coordination."""
        await self._inner.release(partitions)

    async def load(self, partitions: Sequence[int]) -> Snapshot:
        """Load through the inner coordination and report the unfinished calls."""
        snapshot = await self._inner.load(partitions)
        self._tracker.loaded(snapshot)
        return snapshot

    async def get_calls(self, dispatch_ids: Sequence[str]) -> list[CallRecord]:
        """Read calls through the inner coordination."""
        return await self._inner.get_calls(dispatch_ids)

    async def request_cancel(self, dispatch_id: str) -> None:
        """Ask for a cancellation through the inner coordination."""
        await self._inner.request_cancel(dispatch_id)

    async def take_slot(self, function: str, limit: int, held: Sequence[int]) -> int | None:
        """Take a slot through the inner coordination."""
        return await self._inner.take_slot(function, limit, held)

    async def give_slot(self, function: str, slot: int) -> None:
        """Give a slot back through the inner coordination."""
        await self._inner.give_slot(function, slot)

    async def replicas(self) -> dict[str, int]:
        """List the live replicas through the inner coordination."""
        return await self._inner.replicas()


def finished_line(rec: CallRecord, console: Console) -> str:
    """Describe a finished call on one line: function, input, result or error, timing.

    Attempts count the Run requests that did not end in a poll: the first run, retries
    and tail calls.
    """
    result = call_pb2.CallResult.FromString(rec.result) if rec.result else call_pb2.CallResult()
    ok = rec.status == Status.OK
    args = describe_input(any_pb2.Any.FromString(rec.input), 60) if rec.input else "()"
    outcome = describe_result(result, rec.status, 160)
    elapsed = (rec.finished_at or rec.updated_at) - rec.created_at
    attempts = plural(max(rec.attempts - rec.polls, 1), "attempt")
    details = f"{format_duration(elapsed)}, {attempts}"
    if ok:
        tag = console.paint("done  ", Style.GREEN)
        text = f"{tag} {rec.function}{args} -> {outcome}"
    else:
        tag = console.paint("failed", Style.RED)
        status = _status_name(rec.status)
        text = f"{tag} {rec.function}{args}: {console.paint(outcome, Style.RED)}"
        if not outcome.lower().startswith(status):  # "NOT_FOUND: ..." names it already
            details = f"{status}, {details}"
    return f"{text}  ({details})  {console.paint(rec.id, Style.DIM)}"


def retry_line(rec: CallRecord, in_a_row: int, console: Console) -> str:
    """Describe on one line a call whose attempt failed and is retried."""
    args = describe_input(any_pb2.Any.FromString(rec.input), 60) if rec.input else "()"
    tag = console.paint("retry ", Style.YELLOW)
    error = shorten(rec.last_error, 160)
    times = "" if in_a_row == 1 else f" ({in_a_row} in a row)"
    return (
        f"{tag} {rec.function}{args}: attempt failed{times}: {error}; retried  "
        f"{console.paint(rec.id, Style.DIM)}"
    )


def _status_name(status: int) -> str:
    try:
        return Status(status).name.lower()
    except ValueError:
        return f"status {status}"


class Progress:
    """Shows a scheduler's calls: a line per finished top-level call, a live status line.

    At most `_LINES_PER_SECOND` finished calls get a line each second; those past it are
    counted, and one line says how many at the end of that second.

    Args:
        console: Where to write.
        tracker: The scheduler's call tracker (its `on_finished` is set here).
        prefix: Text put before every line (``"dispatch | "``).
        running: Returns the dispatch ids of the calls being run (for the status line).
    """

    def __init__(
        self,
        console: Console,
        tracker: CallTracker,
        *,
        prefix: str = "",
        running: Callable[[], list[str]] | None = None,
    ) -> None:
        self._console = console
        self._tracker = tracker
        self._prefix = prefix
        self._running = running
        self._started = time.monotonic()
        self._second = 0.0  # when the current second of finished lines began
        self._lines = 0  # finished lines written in it
        self._held = [0, 0]  # finished calls past the budget: done, failed
        self._flush: asyncio.TimerHandle | None = None
        tracker.on_finished = self._finished
        tracker.on_retry = self._retried

    def _retried(self, rec: CallRecord, in_a_row: int) -> None:
        # The 1st, 2nd, 4th, 8th ... failure in a row: an outage of many calls stays
        # readable, and a call that keeps failing still shows.
        if in_a_row & (in_a_row - 1) == 0:
            self._console.line(self._prefix + retry_line(rec, in_a_row, self._console))

    def _finished(self, rec: CallRecord) -> None:
        now = time.monotonic()
        if now - self._second >= 1.0:
            self._second, self._lines = now, 0
        if self._lines < _LINES_PER_SECOND:
            self._lines += 1
            self._console.line(self._prefix + finished_line(rec, self._console))
        else:
            self._held[rec.status != Status.OK] += 1
            if self._flush is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # told outside an event loop: nothing to wait with
                    self._write_held()
                else:
                    self._flush = loop.call_later(self._second + 1.0 - now, self._write_held)
        if self._console.live:  # the counts changed too
            self._console.status(self.status_text(self._tracker.counts()))

    def _write_held(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        done, failed = self._held
        if not done and not failed:
            return
        self._held = [0, 0]
        parts = [self._console.paint(f"{done} done", Style.GREEN)] if done else []
        if failed:
            parts.append(self._console.paint(f"{failed} failed", Style.RED))
        self._console.line(
            f"{self._prefix}... and {plural(done + failed, 'more call')} finished "
            f"({', '.join(parts)}); 'dispatch-aio calls' lists them"
        )

    def status_text(self, counts: Counts) -> str:
        """Return the status line for `counts`."""
        parts = [
            f"{counts.pending} pending",
            f"{counts.running} running",
            f"{counts.suspended} suspended",
            *(
                [self._console.paint(f"{counts.retrying} retrying", Style.YELLOW)]
                if counts.retrying
                else []
            ),
            self._console.paint(f"{counts.done} done", Style.GREEN),
            self._console.paint(
                f"{counts.failed} failed", Style.RED if counts.failed else Style.DIM
            ),
        ]
        elapsed = format_duration(time.monotonic() - self._started)
        return f"{self._prefix}{', '.join(parts)}  [{elapsed}]"

    async def run(self) -> None:
        """Redraw the status line until cancelled (only when the console is live)."""
        if not self._console.live:
            return
        tick = 0
        try:
            while True:
                if self._running is not None and tick % _RUNNING_EVERY == 0:
                    try:
                        self._tracker.set_running(self._running())
                    except Exception as exc:  # the status line is best effort
                        logger.debug("cannot list running calls: %s", exc)
                counts = self._tracker.counts()
                if counts.unfinished or counts.done or counts.failed:
                    self._console.status(self.status_text(counts))
                tick += 1
                await asyncio.sleep(_REFRESH)
        finally:
            self._console.close()

    def summary(self) -> str:
        """Return the closing line: calls done, failed and left unfinished.

        Calls held back from the lines of the last second are written first.
        """
        self._write_held()
        counts = self._tracker.counts()
        parts = [f"{counts.done} done", f"{counts.failed} failed"]
        text = "calls: " + ", ".join(parts)
        if counts.unfinished:
            text += f", {counts.unfinished} unfinished"
        return text
