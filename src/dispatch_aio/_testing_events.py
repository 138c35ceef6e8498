"""Durable events and schedules in `dispatch_aio.testing.Environment`, on its clock.

The environment plays the part of dispatch_aio's scheduler: a call to the reserved wait
function is answered here (never run), with the event's outcome once the test sends it,
or with a STATUS_TIMEOUT error when its expiration passes on the environment's clock.
Schedules fire on the same clock, so a nightly schedule fires in a test without waiting.
"""

from __future__ import annotations

__all__ = ["EventBoard", "ScheduleBoard"]

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from google.protobuf import any_pb2

from . import _codec
from ._reserved import event_key_problem
from ._status import Status
from .errors import EventAlreadyResolvedError
from .proto.sdk.v1 import call_pb2, error_pb2
from .scheduler._engine import DEFAULT_EXPIRATION
from .scheduler._timing import Missed, Timing, due_firings


def _wait_error(status: Status, message: str) -> call_pb2.CallResult:
    return call_pb2.CallResult(error=error_pb2.Error(type=status.proto_name, message=message))


class EventBoard:
    """The durable events of an environment: outcomes by key, and the calls waiting."""

    def __init__(self, sleep_until: Callable[[float], Awaitable[None]], now: Callable[[], float]):
        self._sleep_until = sleep_until
        self._now = now
        self._resolved: dict[str, call_pb2.CallResult] = {}
        self._waiting: dict[str, list[asyncio.Future[call_pb2.CallResult]]] = {}
        self._changed = asyncio.Event()

    async def wait(self, call: call_pb2.Call) -> tuple[Status, call_pb2.CallResult]:
        """Answer a call to the wait function: the event's outcome, or a timeout."""
        try:
            key = _codec.decode_value(call.input)
        except _codec.DecodeError:
            key = None
        problem = "the event key is not a string" if not isinstance(key, str) else None
        problem = problem or event_key_problem(key)  # type: ignore[arg-type]
        if problem is not None:
            return Status.INVALID_ARGUMENT, _wait_error(Status.INVALID_ARGUMENT, problem)
        assert isinstance(key, str)
        seconds = DEFAULT_EXPIRATION
        if call.HasField("expiration") and call.expiration.ToNanoseconds() > 0:
            seconds = call.expiration.ToNanoseconds() / 1e9
        resolved = self._resolved.get(key)
        if resolved is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(key, []).append(future)
            self._notify()
            timer = asyncio.ensure_future(self._sleep_until(self._now() + seconds))
            try:
                await asyncio.wait([future, timer], return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
                waiting = self._waiting.get(key, [])
                if future in waiting:
                    waiting.remove(future)
            if not future.done():
                future.cancel()
                message = f"the event {key!r} was not sent within {seconds:.6g} s"
                return Status.TIMEOUT, _wait_error(Status.TIMEOUT, message)
            resolved = future.result()
        status = Status.PERMANENT_ERROR if resolved.HasField("error") else Status.OK
        return status, resolved

    def send(self, key: str, value: Any = None, *, error: BaseException | None = None) -> int:
        """Resolve an event; return the number of calls that were waiting on it."""
        problem = event_key_problem(key)
        if problem is not None:
            raise ValueError(problem)
        if key in self._resolved:
            raise EventAlreadyResolvedError(
                f"the event {key!r} is already resolved: an event is resolved once"
            )
        if error is not None and value is not None:
            raise ValueError("send_event(): give a value or an error, not both")
        result = call_pb2.CallResult()
        if error is not None:
            result.error.CopyFrom(_codec.encode_error(error))
        else:
            result.output.CopyFrom(_codec.encode_value(value, context=f"the event {key!r}"))
        self._resolved[key] = result
        waiting = self._waiting.pop(key, [])
        for future in waiting:
            if not future.done():
                future.set_result(result)
        return len(waiting)

    def waiting(self, key: str) -> int:
        """The number of calls waiting on `key`."""
        return len(self._waiting.get(key, ()))

    async def until_waiting(self, key: str, count: int) -> None:
        """Return once at least `count` calls wait on `key`."""
        while self.waiting(key) < count:
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()


@dataclasses.dataclass
class _Schedule:
    id: str
    function: str
    input: any_pb2.Any
    timing: Timing
    missed: Missed
    next_at: float
    paused: bool = False


class ScheduleBoard:
    """The schedules of an environment, fired on its clock by `run_for`."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._schedules: dict[str, _Schedule] = {}

    def add(
        self,
        schedule_id: str,
        function: str,
        input: any_pb2.Any,
        *,
        cron: str | None,
        time_zone: str,
        every: float | None,
        missed: Literal["skip", "once", "all"],
    ) -> None:
        """Add a schedule (see `Environment.schedule`)."""
        if (cron is None) == (every is None):
            raise ValueError("give a schedule either cron= or every=, not both or neither")
        if schedule_id in self._schedules:
            raise ValueError(f"a schedule with id {schedule_id!r} exists")
        now = self._now()
        timing = Timing.cron(cron, time_zone) if cron is not None else Timing.every(every, now)  # type: ignore[arg-type]
        policy = Missed.parse(missed)
        self._schedules[schedule_id] = _Schedule(
            schedule_id, function, input, timing, policy, timing.next_after(now)
        )

    def set_paused(self, schedule_id: str, paused: bool) -> None:
        """Pause or resume a schedule (resumed: from its first firing after now)."""
        entry = self._schedules[schedule_id]
        if entry.paused and not paused:
            entry.next_at = entry.timing.next_after(self._now())
        entry.paused = paused

    def remove(self, schedule_id: str) -> None:
        """Delete a schedule."""
        del self._schedules[schedule_id]

    def next_firing(self) -> float | None:
        """The earliest firing time of the active schedules."""
        times = [s.next_at for s in self._schedules.values() if not s.paused]
        return min(times) if times else None

    def due(self) -> list[tuple[str, str, any_pb2.Any, float]]:
        """Take the firings due now: (schedule id, function, input, firing time)."""
        now = self._now()
        fired: list[tuple[str, str, any_pb2.Any, float]] = []
        for entry in self._schedules.values():
            if entry.paused or entry.next_at > now:
                continue
            times, entry.next_at = due_firings(entry.timing, entry.next_at, now, entry.missed)
            fired.extend((entry.id, entry.function, entry.input, when) for when in times)
        fired.sort(key=lambda firing: firing[3])
        return fired
