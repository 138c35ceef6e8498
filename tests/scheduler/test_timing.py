"""When schedules fire: cron in time zones (daylight saving included), intervals, missed firings."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from dispatch_aio.scheduler._timing import (
    MAX_CATCH_UP,
    MISSED_GRACE,
    InvalidScheduleError,
    Missed,
    Timing,
    due_firings,
)

PARIS = ZoneInfo("Europe/Paris")


def at(text: str, zone: ZoneInfo = PARIS) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def local(when: float) -> str:
    return datetime.fromtimestamp(when, PARIS).isoformat()


def test_cron_fires_at_local_time_across_daylight_saving() -> None:
    timing = Timing.cron("0 2 * * *", "Europe/Paris")
    when = at("2026-03-27T12:00:00")
    fired = []
    for _ in range(3):
        when = timing.next_after(when)
        fired.append(local(when))
    # 02:00 does not exist on 29 March in Paris: that night fires at 03:00 (summer time).
    assert fired == [
        "2026-03-28T02:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:00:00+02:00",
    ]
    # 02:00 happens twice on 25 October: it fires once.
    autumn = timing.next_after(at("2026-10-24T12:00:00"))
    assert timing.next_after(autumn) - autumn >= 24 * 3600
    assert timing.last_until(autumn) == autumn
    assert timing.last_until(autumn - 1) < autumn - 3600


def test_intervals_count_from_their_anchor() -> None:
    timing = Timing.every(10, anchor=1000.0)
    assert timing.next_after(1000.0) == 1010.0
    assert timing.next_after(1015.5) == 1020.0
    assert timing.last_until(1029.9) == 1020.0
    assert timing.next_after(500.0) == 1000.0
    # Rounding never returns the time itself: each firing moves the schedule on.
    odd = Timing.every(0.1 * 3 + 1, anchor=1_733_410_000.123456)
    when = odd.anchor
    for _ in range(1000):
        later = odd.next_after(when)
        assert later > when and odd.last_until(later) == later
        when = later


@pytest.mark.parametrize(
    ("missed", "fired"),
    [
        (Missed.SKIP, []),
        (Missed.ONCE, [1000.0 + 3600 - 70]),
        (Missed.ALL, [1000.0 + 10 * k for k in range(354)]),
    ],
)
def test_missed_firings_follow_the_policy(missed: Missed, fired: list[float]) -> None:
    timing = Timing.every(10, anchor=1000.0)
    now = 1000.0 + 3600  # down for an hour: 361 firings due, the last 6 within the grace
    on_time = [now - 60 + 10 * k for k in range(7)]
    times, next_at = due_firings(timing, 1000.0, now, missed)
    assert times == fired + on_time
    assert next_at == now + 10
    assert all(now - t <= MISSED_GRACE for t in on_time)


def test_catching_up_all_is_bounded_and_a_punctual_tick_fires_once() -> None:
    timing = Timing.every(1, anchor=0.0)
    times, _ = due_firings(timing, 1.0, 100_000.0, Missed.ALL)
    assert len(times) == MAX_CATCH_UP + 61 and times[-1] == 100_000.0
    assert due_firings(timing, 5.0, 5.2, Missed.SKIP) == ([5.0], 6.0)
    assert due_firings(timing, 6.0, 5.2, Missed.SKIP) == ([], 6.0)


def test_invalid_definitions_say_what_to_fix() -> None:
    with pytest.raises(InvalidScheduleError, match="five fields"):
        Timing.cron("every day")
    with pytest.raises(InvalidScheduleError, match="unknown time zone 'Europe/Pariss'"):
        Timing.cron("0 2 * * *", "Europe/Pariss")
    with pytest.raises(InvalidScheduleError, match="at least 1 second"):
        Timing.every(0.1, anchor=0.0)
    with pytest.raises(InvalidScheduleError, match="'skip', 'once' or 'all'"):
        Missed.parse("some")
    assert Timing.cron("0 2 * * *", "UTC").zone is UTC or Timing.cron("0 2 * * *").zone
