"""Schedules: calls made at the times of a cron expression or at a fixed interval.

Each schedule is a stored row: its definition (a ``dispatch_aio.v1.Schedule``) and the
time of its next firing not made yet. One timer, set for the earliest firing of all
the schedules, wakes `Schedules`; it makes the due firings of each schedule, as
ordinary calls submitted through the engine, and moves the schedule's next firing
time in the same transaction. A firing's idempotency key is made of the schedule id
and the firing time: a crash (or a second submission) never makes one firing twice.
Firings missed while the scheduler was down follow the schedule's policy (see
`_timing`).

Replicas sharing a store each keep every schedule, and read them again from the store
before each operation and each round of firings, and when another replica says it
changed one: a replica that dies leaves no schedule behind. A firing made by two
replicas at once is still made once (its idempotency key), and it only moves the
stored next firing forward (`MoveSchedule`), so it never undoes a pause or a deletion
made meanwhile elsewhere.
"""

from __future__ import annotations

__all__ = [
    "MAX_SCHEDULE_ID_LENGTH",
    "ScheduleExistsError",
    "ScheduleNotFoundError",
    "Schedules",
    "firing_key",
]

import asyncio
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable

from ..proto.sdk.v1 import call_pb2
from ..proto.v1 import schedule_pb2
from ._engine import Engine, InvalidCallError
from ._failures import log_failure
from ._timing import InvalidScheduleError, Missed, Timing, due_firings
from ._validate import call_problem
from .store import DeleteSchedule, MoveSchedule, PutSchedule, ScheduleRecord, Store

logger = logging.getLogger("dispatch_aio.scheduler")

MAX_SCHEDULE_ID_LENGTH = 128
"""Longest schedule id accepted, in characters."""
_TIMER_SLACK = 0.001  # fire a little late rather than early
_RETRY_DELAY = 1.0  # seconds before a schedule whose firing could not be recorded is retried

_MISSED = {
    schedule_pb2.MISSED_POLICY_UNSPECIFIED: Missed.SKIP,
    schedule_pb2.MISSED_POLICY_SKIP: Missed.SKIP,
    schedule_pb2.MISSED_POLICY_ONCE: Missed.ONCE,
    schedule_pb2.MISSED_POLICY_ALL: Missed.ALL,
}


class ScheduleNotFoundError(LookupError):
    """No schedule has this id."""

    def __init__(self, schedule_id: str) -> None:
        super().__init__(
            f"no schedule with id {schedule_id!r}: `dispatch-aio schedule list` lists them"
        )


class ScheduleExistsError(ValueError):
    """Another schedule has this id."""

    def __init__(self, schedule_id: str) -> None:
        super().__init__(
            f"a schedule with id {schedule_id!r} exists with another definition: delete it "
            "first, or give the new one another id"
        )


def firing_key(schedule_id: str, when: float) -> str:
    """The idempotency key of a schedule's firing at `when` (Unix seconds)."""
    return f"schedule:{schedule_id}:{round(when * 1000)}"


@dataclasses.dataclass(slots=True)
class _Entry:
    record: ScheduleRecord
    spec: schedule_pb2.Schedule
    timing: Timing
    missed: Missed
    retry_at: float = 0.0  # after a failed firing: when to try again


def _timing(spec: schedule_pb2.Schedule, created: float) -> Timing:
    which = spec.WhichOneof("timing")
    if which == "cron":
        return Timing.cron(spec.cron.expression, spec.cron.time_zone)
    if which == "interval":
        return Timing.every(spec.interval.ToNanoseconds() / 1e9, created)
    raise InvalidScheduleError("a schedule needs a cron expression or an interval")


def _definition(spec: schedule_pb2.Schedule) -> schedule_pb2.Schedule:
    """The parts of a schedule its creator gives (what makes two definitions equal)."""
    kept = schedule_pb2.Schedule()
    kept.CopyFrom(spec)
    for name in ("paused", "next_firing", "create_time"):
        kept.ClearField(name)
    if kept.missed == schedule_pb2.MISSED_POLICY_UNSPECIFIED:
        kept.missed = schedule_pb2.MISSED_POLICY_SKIP
    return kept


class Schedules:
    """The schedules of a scheduler, fired through its engine.

    Args:
        engine: Submits the firings.
        store: Keeps the schedules.
        clock: Wall clock (Unix seconds).
    """

    def __init__(self, engine: Engine, store: Store, *, clock: Callable[[], float] = time.time):
        self._engine = engine
        self._store = store
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._ticking: asyncio.Task[None] | None = None
        self._closed = True
        # Replicas share the store: other replicas change the schedules too.
        self._shared = store.coordination() is not None
        self._refreshing: asyncio.Task[None] | None = None
        self._stale = False

    async def start(self) -> None:
        """Load the schedules and make the firings that are due (missed ones by policy)."""
        await self._load()
        self._closed = False
        if self._entries:
            logger.info("%d schedules loaded", len(self._entries))
        if self._shared:
            self._engine.schedules_listener = self._changed_elsewhere
        self._arm()

    async def _load(self) -> None:
        """Read the schedules from the store (under the lock, or before the start)."""
        entries: dict[str, _Entry] = {}
        for record in await self._store.list_schedules():
            known = self._entries.get(record.id)
            if known is not None and known.record.spec == record.spec:
                known.record = record
                entries[record.id] = known
                continue
            spec = schedule_pb2.Schedule.FromString(record.spec)
            try:
                timing = _timing(spec, record.created_at)
            except InvalidScheduleError as exc:  # e.g. a time zone this machine lacks
                if known is None:
                    logger.error("schedule %s cannot fire: %s", record.id, exc)
                continue
            entries[record.id] = _Entry(record, spec, timing, _MISSED[spec.missed])
        self._entries = entries

    async def _refresh(self) -> None:
        """Read the schedules again if other replicas may have changed them."""
        if self._shared:
            await self._load()

    def _changed_elsewhere(self) -> None:
        self._stale = True  # a change told during a reload is read by another round
        if self._closed or self._refreshing is not None:
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._reload_and_arm())

    async def _reload_and_arm(self) -> None:
        try:
            while self._stale and not self._closed:
                self._stale = False
                async with self._lock:
                    await self._load()
        except Exception as exc:
            log_failure(logger, exc, "the schedules changed by another replica could not be read")
        finally:
            self._refreshing = None
        self._arm()

    async def close(self) -> None:
        """Stop firing; the schedules stay in the store."""
        self._closed = True
        if self._engine.schedules_listener == self._changed_elsewhere:
            self._engine.schedules_listener = None
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ticking is not None:
            self._ticking.cancel()
            await asyncio.gather(self._ticking, return_exceptions=True)
            self._ticking = None

    # Operations.

    async def create(self, spec: schedule_pb2.Schedule) -> schedule_pb2.Schedule:
        """Create a schedule; return it as stored (same id and definition: the existing one).

        Raises:
            InvalidScheduleError: The definition is invalid.
            ScheduleExistsError: Another schedule has the id.
            StoreError: It could not be stored.
        """
        definition = _definition(spec)
        if not definition.id:
            definition.id = f"sched_{secrets.token_hex(8)}"
        schedule_id = definition.id
        if len(schedule_id) > MAX_SCHEDULE_ID_LENGTH or not schedule_id.isprintable():
            raise InvalidScheduleError(
                f"invalid schedule id {schedule_id[:40]!r}: use at most "
                f"{MAX_SCHEDULE_ID_LENGTH} printable characters"
            )
        call = self._call(definition)
        default = self._engine.settings.default_endpoint
        problem = call_problem(call, "the schedule's call", default_endpoint=default)
        if problem is not None:
            raise InvalidScheduleError(problem)
        now = self._clock()
        timing = _timing(definition, now)
        async with self._lock:
            await self._refresh()
            existing = self._entries.get(schedule_id)
            if existing is not None:
                if _definition(existing.spec) == definition:
                    return self._view(existing)
                raise ScheduleExistsError(schedule_id)
            record = ScheduleRecord(
                schedule_id,
                definition.SerializeToString(),
                next_at=timing.next_after(now),
                paused=False,
                created_at=now,
            )
            await self._store.write([PutSchedule(record)])
            entry = _Entry(record, definition, timing, _MISSED[definition.missed])
            self._entries[schedule_id] = entry
        logger.info("schedule %s created: %s", schedule_id, definition.function)
        self._arm()
        return self._view(entry)

    def list(self) -> list[schedule_pb2.Schedule]:
        """Every schedule, oldest first."""
        entries = sorted(self._entries.values(), key=lambda e: (e.record.created_at, e.record.id))
        return [self._view(entry) for entry in entries]

    async def pause(self, schedule_id: str) -> schedule_pb2.Schedule:
        """Stop a schedule's firings until `resume`.

        Raises:
            ScheduleNotFoundError: No schedule has the id.
        """
        return await self._set_paused(schedule_id, True)

    async def resume(self, schedule_id: str) -> schedule_pb2.Schedule:
        """Resume a paused schedule from its first firing after now.

        Raises:
            ScheduleNotFoundError: No schedule has the id.
        """
        return await self._set_paused(schedule_id, False)

    async def delete(self, schedule_id: str) -> None:
        """Delete a schedule; the calls it made are left as they are.

        Raises:
            ScheduleNotFoundError: No schedule has the id.
        """
        async with self._lock:
            await self._refresh()
            if schedule_id not in self._entries:
                raise ScheduleNotFoundError(schedule_id)
            await self._store.write([DeleteSchedule(schedule_id)])
            del self._entries[schedule_id]
        logger.info("schedule %s deleted", schedule_id)
        self._arm()

    async def _set_paused(self, schedule_id: str, paused: bool) -> schedule_pb2.Schedule:
        async with self._lock:
            await self._refresh()
            entry = self._entries.get(schedule_id)
            if entry is None:
                raise ScheduleNotFoundError(schedule_id)
            record = entry.record
            if record.paused != paused:
                next_at = record.next_at if paused else entry.timing.next_after(self._clock())
                record = dataclasses.replace(record, paused=paused, next_at=next_at)
                await self._store.write([PutSchedule(record)])
                entry.record = record
        self._arm()
        return self._view(entry)

    # Firing.

    def _arm(self) -> None:
        """Set the timer for the earliest firing (unless a round of firings is running)."""
        if self._closed or self._ticking is not None:
            return
        active = [e for e in self._entries.values() if not e.record.paused]
        if not active:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        when = min(max(e.record.next_at, e.retry_at) for e in active)
        if self._timer is not None:
            if self._timer_at == when:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self._clock()) + _TIMER_SLACK
        self._timer = loop.call_later(delay, self._tick)
        self._timer_at = when

    def _tick(self) -> None:
        self._timer = None
        self._ticking = asyncio.get_running_loop().create_task(self._fire_due())

    async def _fire_due(self) -> None:
        try:
            async with self._lock:
                try:
                    await self._refresh()
                except Exception as exc:
                    log_failure(logger, exc, "the schedules could not be read before their firings")
                now = self._clock()
                for entry in list(self._entries.values()):
                    record = entry.record
                    if record.paused or record.next_at > now or entry.retry_at > now:
                        continue
                    await self._fire(entry, now)
        finally:
            self._ticking = None
            self._arm()

    async def _fire(self, entry: _Entry, now: float) -> None:
        record = entry.record
        times, next_at = due_firings(entry.timing, record.next_at, now, entry.missed)
        moved = dataclasses.replace(record, next_at=next_at)
        call = self._call(entry.spec)
        try:
            await self._engine.submit(
                [call] * len(times),
                [firing_key(record.id, when) for when in times],
                with_ops=[MoveSchedule(record.id, next_at)],
            )
        except InvalidCallError as exc:  # e.g. the default endpoint changed
            logger.error("schedule %s cannot fire: %s; it is paused", record.id, exc)
            paused = dataclasses.replace(moved, paused=True)
            try:
                await self._store.write([PutSchedule(paused)])
                entry.record = paused
            except Exception as error:
                log_failure(logger, error, "schedule %s: could not be paused", record.id)
                entry.retry_at = now + _RETRY_DELAY
            return
        except Exception as exc:
            entry.retry_at = now + _RETRY_DELAY * random.uniform(1, 2)
            log_failure(
                logger, exc, "schedule %s: its firing was not recorded; retrying", record.id
            )
            return
        entry.record = moved
        entry.retry_at = 0.0
        logger.debug("schedule %s fired %d calls", record.id, len(times))

    @staticmethod
    def _call(spec: schedule_pb2.Schedule) -> call_pb2.Call:
        call = call_pb2.Call(function=spec.function, endpoint=spec.endpoint, version=spec.version)
        if spec.HasField("input"):
            call.input.CopyFrom(spec.input)
        return call

    @staticmethod
    def _view(entry: _Entry) -> schedule_pb2.Schedule:
        view = schedule_pb2.Schedule()
        view.CopyFrom(entry.spec)
        view.id = entry.record.id
        view.paused = entry.record.paused
        view.next_firing.FromNanoseconds(round(entry.record.next_at * 1e9))
        view.create_time.FromNanoseconds(round(entry.record.created_at * 1e9))
        return view
