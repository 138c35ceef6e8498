"""When schedules fire: cron expressions in a time zone, fixed intervals, missed firings.

Cron expressions are read by cronsim (five fields, minute to day of week, and an
optional sixth for seconds), in an IANA time zone from `zoneinfo`: ``0 2 * * *`` in
``Europe/Paris`` fires at 02:00 Paris time, summer and winter; on the night clocks skip
02:00 it fires at the first time after the gap, and on the night 02:00 happens twice it
fires once. An interval fires at ``created + k * interval``.

A firing is *missed* when it is more than `MISSED_GRACE` seconds late when the
scheduler gets to it (the scheduler was down, or overloaded): the schedule's policy
then says what to do with such firings. Firings later by less are made as usual.
"""

from __future__ import annotations

__all__ = [
    "MAX_CATCH_UP",
    "MIN_INTERVAL",
    "MISSED_GRACE",
    "InvalidScheduleError",
    "Missed",
    "Timing",
    "due_firings",
]

import enum
import math
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cronsim

MISSED_GRACE = 60.0
"""Seconds a firing may be late and still be made as usual."""
MAX_CATCH_UP = 1000
"""Most missed firings made at once with the ``all`` policy (the latest ones)."""
MIN_INTERVAL = 1.0
"""Shortest interval accepted, in seconds."""


class InvalidScheduleError(ValueError):
    """A schedule's definition is invalid; the message says what to fix."""


class Missed(enum.Enum):
    """What a schedule does with firings it missed (see the module docstring)."""

    SKIP = "skip"
    """Drop them; carry on with the next firing."""
    ONCE = "once"
    """Make one firing for all of them, at the latest missed time."""
    ALL = "all"
    """Make each of them (the latest `MAX_CATCH_UP`), oldest first."""

    @classmethod
    def parse(cls, text: str) -> Missed:
        """Read a policy name; raise `InvalidScheduleError` naming the choices."""
        try:
            return cls(text)
        except ValueError:
            raise InvalidScheduleError(
                f"invalid missed policy {text!r}: use 'skip', 'once' or 'all'"
            ) from None


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule fires: a cron expression in a time zone, or an interval.

    Build it with `cron` or `every`, which check the definition.
    """

    expression: str = ""
    zone: tzinfo = UTC
    interval: float = 0.0
    anchor: float = 0.0
    """Unix seconds an interval counts from."""

    @classmethod
    def cron(cls, expression: str, time_zone: str = "") -> Timing:
        """A cron expression read in `time_zone` (an IANA name; empty: UTC).

        Raises:
            InvalidScheduleError: The expression or the time zone is invalid.
        """
        zone: tzinfo = UTC
        if time_zone and time_zone.upper() != "UTC":
            try:
                zone = ZoneInfo(time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise InvalidScheduleError(
                    f"unknown time zone {time_zone!r}: use an IANA name such as "
                    "'Europe/Paris' or 'America/New_York', or UTC"
                ) from None
        try:
            cronsim.CronSim(expression, datetime.now(zone))
        except cronsim.CronSimError as exc:
            raise InvalidScheduleError(
                f"invalid cron expression {expression!r} ({exc}): use five fields, "
                "minute hour day-of-month month day-of-week, e.g. '0 2 * * *' for 02:00 "
                "every day"
            ) from None
        return cls(expression=expression, zone=zone)

    @classmethod
    def every(cls, seconds: float, anchor: float) -> Timing:
        """An interval of `seconds`, counted from `anchor` (Unix seconds).

        Raises:
            InvalidScheduleError: The interval is shorter than `MIN_INTERVAL`.
        """
        if not (math.isfinite(seconds) and seconds >= MIN_INTERVAL):
            raise InvalidScheduleError(
                f"invalid interval {seconds!r}: use at least {MIN_INTERVAL:g} second"
            )
        return cls(interval=seconds, anchor=anchor)

    def next_after(self, when: float) -> float:
        """The first firing time strictly after `when` (Unix seconds)."""
        if self.interval:
            steps = max(math.floor((when - self.anchor) / self.interval) + 1, 0)
            while self.anchor + steps * self.interval <= when:  # rounding of the division
                steps += 1
            return self.anchor + steps * self.interval
        start = datetime.fromtimestamp(when, self.zone)
        return next(cronsim.CronSim(self.expression, start)).timestamp()

    def last_until(self, when: float) -> float:
        """The last firing time at or before `when` (-inf if there is none)."""
        if self.interval:
            steps = math.floor((when - self.anchor) / self.interval)
            while self.anchor + (steps + 1) * self.interval <= when:  # rounding, as above
                steps += 1
            while steps >= 0 and self.anchor + steps * self.interval > when:
                steps -= 1
            return self.anchor + steps * self.interval if steps >= 0 else -math.inf
        # Cron firings fall on whole seconds: the last one strictly before a moment just
        # after the whole second of `when` is the last one at or before `when`.
        start = datetime.fromtimestamp(math.floor(when) + 0.001, self.zone)
        return next(cronsim.CronSim(self.expression, start, reverse=True)).timestamp()


def due_firings(
    timing: Timing, next_at: float, now: float, missed: Missed
) -> tuple[list[float], float]:
    """The firings to make at `now`, oldest first, and the next firing time after them.

    Args:
        timing: When the schedule fires.
        next_at: The schedule's first firing not made yet.
        now: The current time.
        missed: What to do with the firings more than `MISSED_GRACE` late.
    """
    if next_at > now:
        return [], next_at
    cutoff = now - MISSED_GRACE  # firings before it are missed
    fire: list[float] = []
    when = next_at
    if next_at < cutoff:
        last_missed = timing.last_until(cutoff - 0.001)
        if missed is Missed.ONCE:
            fire.append(last_missed)
        elif missed is Missed.ALL:
            earlier = last_missed
            while earlier >= next_at and len(fire) < MAX_CATCH_UP:
                fire.append(earlier)
                earlier = timing.last_until(earlier - 0.001)
            fire.reverse()
        when = timing.next_after(last_missed)
    while when <= now:
        fire.append(when)
        when = timing.next_after(when)
    return fire, when
