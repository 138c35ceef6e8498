"""The console of a local scheduler: a burst of finished calls stays readable."""

from __future__ import annotations

import asyncio
from io import StringIO

from dispatch_aio import Status
from dispatch_aio.cli._console import Console
from dispatch_aio.cli._progress import _LINES_PER_SECOND, CallTracker, Progress
from dispatch_aio.scheduler.store import CallRecord, InsertCall, Phase, UpdateCall


def _call(i: int) -> CallRecord:
    return CallRecord(
        id=f"{i:032x}", root_id=f"{i:032x}", parent_id="", correlation_id=0,
        parent_generation=0, endpoint="http://127.0.0.1:8000", function="f", input=b"",
        version="", created_at=1.0, expires_at=100.0, phase=Phase.PENDING, updated_at=1.0,
    )  # fmt: skip


def _finish(tracker: CallTracker, calls: list[CallRecord], failed: set[int]) -> None:
    tracker.applied([InsertCall(c) for c in calls])
    tracker.applied(
        [
            UpdateCall(
                c._replace(
                    phase=Phase.DONE,
                    status=Status.PERMANENT_ERROR if i in failed else Status.OK,
                    finished_at=2.0,
                )
            )
            for i, c in enumerate(calls)
        ]
    )


async def test_a_burst_of_finished_calls_is_counted_past_the_budget() -> None:
    out = StringIO()
    progress = Progress(Console(out, StringIO(), color=False, live=False), CallTracker())
    tracker = progress._tracker
    _finish(tracker, [_call(i) for i in range(100)], failed={90, 95})
    lines = out.getvalue().splitlines()
    assert len(lines) == _LINES_PER_SECOND
    assert all(line.startswith("done   f()") for line in lines)
    await asyncio.sleep(1.1)  # the end of that second writes the count
    held = out.getvalue().splitlines()[_LINES_PER_SECOND:]
    assert held == [
        f"... and {100 - _LINES_PER_SECOND} more calls finished "
        f"({100 - _LINES_PER_SECOND - 2} done, 2 failed); 'dispatch-aio calls' lists them"
    ]
    # A new second has its own budget.
    _finish(tracker, [_call(i) for i in range(100, 103)], failed=set())
    assert len(out.getvalue().splitlines()) == _LINES_PER_SECOND + 1 + 3
    assert progress.summary() == "calls: 101 done, 2 failed"


async def test_calls_held_back_are_written_before_the_summary() -> None:
    out = StringIO()
    progress = Progress(Console(out, StringIO(), color=False, live=False), CallTracker())
    _finish(progress._tracker, [_call(i) for i in range(_LINES_PER_SECOND + 1)], failed=set())
    assert progress.summary() == f"calls: {_LINES_PER_SECOND + 1} done, 0 failed"
    assert out.getvalue().splitlines()[-1] == (
        "... and 1 more call finished (1 done); 'dispatch-aio calls' lists them"
    )
    await asyncio.sleep(1.1)  # written once
    assert len(out.getvalue().splitlines()) == _LINES_PER_SECOND + 1


def test_outside_an_event_loop_a_call_past_the_budget_is_counted_at_once() -> None:
    out = StringIO()
    progress = Progress(Console(out, StringIO(), color=False, live=False), CallTracker())
    _finish(progress._tracker, [_call(i) for i in range(_LINES_PER_SECOND + 2)], failed={0})
    assert (
        out.getvalue().splitlines()[_LINES_PER_SECOND:]
        == ["... and 1 more call finished (1 done); 'dispatch-aio calls' lists them"] * 2
    )
    assert progress.summary() == f"calls: {_LINES_PER_SECOND + 1} done, 1 failed"
