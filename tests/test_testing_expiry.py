"""dispatch_aio.testing expires calls and retries them as the scheduler does."""

from __future__ import annotations

import asyncio
import itertools
import time

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


@app.function(name="brief", expiration=60)
async def brief(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "in time"


@app.function(name="calls_brief")
async def calls_brief(seconds: float) -> str:
    try:
        return await brief(seconds)
    except TimeoutError as exc:
        return f"caught: {exc}"


async def test_a_function_expiration_policy_bounds_its_calls() -> None:
    expired = "function 'brief': the call expired: it did not finish within 60 s"
    async with Environment(app) as env:
        assert await env.call(brief, 59) == "in time"
        with pytest.raises(errors.DispatchTimeoutError, match=expired):
            await env.call(brief, 61)
        assert await env.call(calls_brief, 61) == f"caught: {expired}"  # made by a call
        info = await env.run(calls_brief, 1)
        child = info.children[0]
        assert child.expires_at - child.created_at == 60
        assert info.expires_at - info.created_at == 7 * 24 * 3600
    async with Environment(app, replay="process") as env:  # a new process at each round
        assert await env.call(calls_brief, 61) == f"caught: {expired}"


@app.function(name="dawdle", timeout=0.2, retry=dispatch_aio.RetryPolicy(max_attempts=3))
async def dawdle(seconds: float) -> str:
    tries.append(dispatch_aio.now().timestamp())
    await asyncio.sleep(seconds)  # waited out within the attempt: it counts
    return "answered"


async def test_an_attempt_past_its_timeout_is_retried_then_fails_as_in_the_scheduler() -> None:
    tries.clear()
    async with Environment(app) as env:
        assert await env.call(dawdle, 0.1) == "answered"
        tries.clear()
        timed_out = (
            r"function 'dawdle': gave up after 3 failed attempts; the last one: "
            r"the attempt outlived the function's timeout of 0\.2 s"
        )
        with pytest.raises(errors.DispatchTimeoutError, match=timed_out):
            await env.call(dawdle, 0.6)
    assert len(tries) == 3
    # Each request in a new process, which keeps time of its own: the same outcome.
    async with Environment(app, replay="process") as env:
        assert await env.call(dawdle, 0.1) == "answered"
        with pytest.raises(errors.DispatchTimeoutError, match=timed_out):
            await env.call(dawdle, 0.6)


@app.function(name="stuck", timeout=0.1, retry=dispatch_aio.RetryPolicy(max_attempts=2))
def stuck(seconds: float) -> str:
    time.sleep(seconds)
    return "unstuck"


async def test_a_thread_past_its_timeout_is_cut_on_the_real_clock() -> None:
    async with Environment(app, virtual_time=False) as env:
        started = time.monotonic()
        with pytest.raises(errors.DispatchTimeoutError, match=r"timeout of 0\.1 s"):
            await env.call(stuck, 2.0)
        assert time.monotonic() - started < 1.5  # cut twice, not waited for
    async with Environment(app) as env:  # a thread takes no virtual time
        assert await env.call(stuck, 0.2) == "unstuck"
