"""Durable calls, gather and sequential awaits, in every delivery mode."""

from __future__ import annotations

import asyncio

from dispatch_aio._function import Function
from dispatch_aio._status import Status

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _chain(n: int) -> int:
    total = 0
    for i in range(n):
        total += await double(i)
    return total


chain = Function(_chain, name="chain")


async def _fan(n: int) -> list[int]:
    return list(await asyncio.gather(*(double(i) for i in range(n))))


fan = Function(_fan, name="fan")


async def test_sequential(make_env: EnvFactory) -> None:
    env = make_env(double, chain)
    assert await env.call(chain, 5) == 2 * sum(range(5))


async def test_gather(make_env: EnvFactory) -> None:
    env = make_env(double, fan)
    assert await env.call(fan, 20) == [2 * i for i in range(20)]
    polls = [r.poll for r in env.responses if r.WhichOneof("directive") == "poll"]
    first = polls[0]
    assert len(first.calls) == 20
    assert [c.correlation_id for c in first.calls] == list(range(1, 21))
    assert first.min_results == 1 and first.max_results == 20
    assert not first.HasField("max_wait")
    assert all(r.status == Status.OK for r in env.responses)
