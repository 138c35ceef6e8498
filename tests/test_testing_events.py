"""dispatch_aio.testing: durable events and schedules on virtual time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

import dispatch_aio
from dispatch_aio import Call, Dispatch
from dispatch_aio.errors import EventAlreadyResolvedError
from dispatch_aio.testing import Environment

dispatch = Dispatch(env={})


class Refused(Exception):
    pass


@dispatch.function
async def approve(order: str) -> str:
    try:
        value = await dispatch_aio.wait_event(f"approval-{order}", timeout=24 * 3600)
    except TimeoutError:
        return "cancelled"
    except Refused as exc:
        return f"refused: {exc}"
    return f"approved by {value}"


@dispatch.function
async def report(name: str) -> str:
    return f"{name} at {dispatch_aio.now():%H:%M}"


@pytest.mark.parametrize("replay", ["cached", "always"])
async def test_a_waiting_call_receives_the_event_once(replay: str) -> None:
    async with Environment(dispatch, replay=replay) as env:  # type: ignore[arg-type]
        task = asyncio.ensure_future(env.call(approve, "1"))
        await env.until_waiting("approval-1")
        started = env.time()
        assert await env.send_event("approval-1", "ann") == 1
        assert await task == "approved by ann"
        assert env.time() - started < 1, "the event came at once: no time passed"
        with pytest.raises(EventAlreadyResolvedError, match="already resolved"):
            await env.send_event("approval-1", "bob")
        # A call that waits after the resolution gets the value at once.
        assert await env.call(approve, "1") == "approved by ann"


async def test_an_error_and_a_timeout_on_virtual_time() -> None:
    async with Environment(dispatch) as env:
        await env.send_event("approval-2", error=Refused("no stock"))
        assert await env.call(approve, "2") == "refused: no stock"
        started = env.time()
        assert await env.call(approve, "3") == "cancelled"
        assert 24 * 3600 <= env.time() - started < 24 * 3600 + 5


async def test_schedules_fire_on_virtual_time() -> None:
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()
    async with Environment(dispatch) as env:
        env.clock.advance_to(start)
        nightly = env.schedule(Call(report.name, ("sales",)), cron="0 2 * * *")
        hourly = env.schedule(Call(report.name, ("hourly",)), every=3600, id="hourly")
        assert hourly == "hourly"
        fired = await env.run_for(24 * 3600)
        outputs = [info.output for info in fired]
        assert outputs.count("sales at 02:00") == 1
        assert len([o for o in outputs if o.startswith("hourly")]) == 24
        env.pause_schedule(nightly)
        env.delete_schedule(hourly)
        assert await env.run_for(3 * 24 * 3600) == []
        env.resume_schedule(nightly)
        fired = await env.run_for(24 * 3600)
        assert [info.output for info in fired] == ["sales at 02:00"]
