"""Durable events and I/O: calls go out while I/O runs; replay keeps their relative order."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatch_aio._function import Function

from .conftest import EnvFactory


async def _slow_double(x: int) -> int:
    await asyncio.to_thread(time.sleep, 1.0)
    return 2 * x


slow_double = Function(_slow_double, name="slow_double")


async def _io_and_call_together() -> list[object]:
    return list(await asyncio.gather(asyncio.to_thread(time.sleep, 1.0), slow_double(21)))


io_and_call_together = Function(_io_and_call_together, name="io_and_call_together")


@pytest.mark.parametrize("mode", ["live"])
async def test_a_call_goes_out_while_io_is_in_flight(make_env: EnvFactory) -> None:
    env = make_env(io_and_call_together, slow_double, virtual_time=False)
    started = time.monotonic()
    assert await env.call(io_and_call_together) == [None, 42]
    # Both take 1 s; one after the other would take 2 s.
    assert time.monotonic() - started < 1.7


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _timer_between_io() -> list[object]:
    log: list[object] = []

    async def ticker() -> None:
        await asyncio.sleep(0.4)  # a durable timer, due while the second operation runs
        log.append("tick")

    task = asyncio.create_task(ticker())
    await asyncio.to_thread(time.sleep, 0.1)
    log.append("io1")
    await asyncio.to_thread(time.sleep, 0.8)
    log.append("io2")
    await task
    log.append(await double(1))
    return log


timer_between_io = Function(_timer_between_io, name="timer_between_io")


async def test_a_timer_replays_at_its_place_among_io_completions(make_env: EnvFactory) -> None:
    env = make_env(timer_between_io, double, virtual_time=False)
    assert await env.call(timer_between_io) == ["io1", "tick", "io2", 2]


async def _result_between_io() -> list[object]:
    log: list[object] = []

    async def caller() -> None:
        log.append(await double(5))

    task = asyncio.create_task(caller())
    await asyncio.to_thread(time.sleep, 0.5)
    log.append("io1")
    await task
    await asyncio.to_thread(time.sleep, 0.05)
    log.append("io2")
    return log


result_between_io = Function(_result_between_io, name="result_between_io")


async def test_a_result_replays_at_its_place_among_io_completions(make_env: EnvFactory) -> None:
    env = make_env(result_between_io, double, virtual_time=False)
    # The call's result comes while the first operation runs: it is applied before.
    assert await env.call(result_between_io) == [10, "io1", "io2"]
