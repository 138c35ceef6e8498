"""Schedules on the embedded scheduler: create, list, fire, pause, resume, delete."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from dispatch_aio import Call, Dispatch
from dispatch_aio.errors import ClientError


async def until(predicate: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - state changed by the scheduler's tasks
            await asyncio.sleep(0.01)


async def test_a_schedule_fires_its_calls_until_paused_or_deleted(tmp_path: Path) -> None:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))
    ticks: list[tuple[str, float]] = []

    @dispatch.function
    async def tick(label: str) -> None:
        ticks.append((label, time.time()))

    async with await dispatch.start():
        schedules = dispatch.client.schedules
        created = await schedules.create(Call(tick.name, ("a",)), every=1, id="every-second")
        assert (created.id, created.function, created.every) == (
            "every-second",
            tick.name,
            timedelta(seconds=1),
        )
        assert created.cron is None and created.missed == "skip" and not created.paused
        # Creating it again with the same definition is harmless; another one is refused.
        again = await schedules.create(Call(tick.name, ("a",)), every=1, id="every-second")
        assert again.created == created.created
        with pytest.raises(ClientError, match="exists with another definition") as info:
            await schedules.create(Call(tick.name, ("b",)), every=1, id="every-second")
        assert info.value.code == "already_exists"
        nightly = await schedules.create(
            Call(tick.name, ("n",)), cron="0 2 * * *", time_zone="Europe/Paris", missed="once"
        )
        assert nightly.id.startswith("sched_") and nightly.time_zone == "Europe/Paris"
        assert nightly.next_firing.astimezone().hour is not None
        assert [s.id for s in await schedules.list()] == ["every-second", nightly.id]

        await until(lambda: len(ticks) >= 2, seconds=5)
        gaps = [b[1] - a[1] for a, b in itertools.pairwise(ticks)]
        assert all(0.5 < gap < 1.5 for gap in gaps), gaps
        paused = await schedules.pause("every-second")
        assert paused.paused
        count = len(ticks)
        await asyncio.sleep(1.5)
        assert len(ticks) == count, "a paused schedule does not fire"
        assert not (await schedules.resume("every-second")).paused
        await until(lambda: len(ticks) > count, seconds=5)
        await schedules.delete("every-second")
        await asyncio.sleep(0.2)
        count = len(ticks)
        await asyncio.sleep(1.5)
        assert len(ticks) == count, "a deleted schedule does not fire"
        assert [s.id for s in await schedules.list()] == [nightly.id]
        with pytest.raises(ClientError, match="no schedule with id 'every-second'") as info:
            await schedules.delete("every-second")
        assert info.value.code == "not_found"


async def test_invalid_schedules_are_refused_with_what_to_fix(tmp_path: Path) -> None:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))

    @dispatch.function
    async def job() -> None:
        pass

    async with await dispatch.start():
        schedules = dispatch.client.schedules
        with pytest.raises(ValueError, match="either cron= or every="):
            await schedules.create(job)
        with pytest.raises(ClientError, match="invalid cron expression '0 2 \\* \\*'"):
            await schedules.create(job, cron="0 2 * *")
        with pytest.raises(ClientError, match="unknown time zone 'Mars/Base'"):
            await schedules.create(job, cron="0 2 * * *", time_zone="Mars/Base")
        with pytest.raises(ClientError, match=r"invalid interval 0\.5"):
            await schedules.create(job, every=0.5)
