"""dispatch_aio.testing expires calls and retries them as the scheduler does."""

from __future__ import annotations

import asyncio
import itertools

import pytest

import dispatch_aio
from dispatch_aio import Dispatch, errors
from dispatch_aio.testing import Environment

app = Dispatch(env={})
tries: list[float] = []


@app.function(name="nap")
async def nap(days: float) -> str:
    await asyncio.sleep(days * 24 * 3600)
    return "rested"


@app.function(name="outer")
async def outer(days: float) -> str:
    return await nap(days)


@app.function(name="flaky")
async def flaky(until: float) -> int:
    tries.append(dispatch_aio.now().timestamp())
    if len(tries) < until:
        raise ConnectionError("down")  # temporary: retried
    return len(tries)


async def test_a_sleep_past_seven_days_expires_as_in_the_scheduler() -> None:
    async with Environment(app) as env:
        assert await env.call(nap, 6.9) == "rested"
        with pytest.raises(TimeoutError, match="the call expired: it did not finish within"):
            await env.call(nap, 8)
        info = await env.run(outer, 8)  # the child expires with its parent
        assert isinstance(info.error, errors.DispatchTimeoutError)
        assert info.children[0].expires_at == info.expires_at


async def test_max_attempts_zero_retries_until_expiry() -> None:
    tries.clear()
    async with Environment(app, max_attempts=0) as env:
        assert await env.call(flaky, 25) == 25  # past the default 10 attempts
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert max(gaps) == 30  # the delay doubles up to the scheduler's longest backoff
    tries.clear()
    async with Environment(app, max_attempts=0, expiration=3600) as env:
        info = await env.run(flaky, 10**6)
        assert isinstance(info.error, TimeoutError)
        assert 100 < info.attempts < 200  # an hour of retries, then expiry
    tries.clear()
    async with Environment(app) as env:  # the default, as --max-attempts
        info = await env.run(flaky, 10**6)
        assert isinstance(info.error, ConnectionError) and info.attempts == 9


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="expiration must be positive"):
        Environment(app, expiration=0)
    with pytest.raises(ValueError, match="max_attempts must be 0"):
        Environment(app, max_attempts=-1)
