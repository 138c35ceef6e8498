"""The test environment enforces the endpoint's size limit, as the scheduler meets it.

A scheduler that signs its requests may send a whole journal up to the endpoint's
limit for signed requests (1 GB): more than 16 MB of results survive a restart.
"""

from __future__ import annotations

import asyncio

import pytest

from dispatch_aio import Dispatch, Status, errors
from dispatch_aio.testing import Environment

dispatch = Dispatch(env={})


@dispatch.function
async def blob(megabytes: int) -> bytes:
    return b"x" * (megabytes * 1_000_000)


@dispatch.function
async def two_blobs() -> int:
    first = await blob(10)
    second = await blob(10)
    return len(first) + len(second)


@dispatch.function
async def gather_1200() -> int:
    return sum(await asyncio.gather(*(echo(i) for i in range(1200))))


@dispatch.function
async def echo(x: int) -> int:
    return x


async def test_a_journal_over_16_mb_resumes_after_a_restart() -> None:
    # Forced replay resends the whole journal at every resume, as after an app restart:
    # two 10 MB results make a 20 MB request, within the limit of signed requests.
    async with Environment(dispatch, replay="always") as env:
        assert await env.call(two_blobs) == 20_000_000
    assert max(len(r.SerializeToString()) for r in env.requests) > 20_000_000


async def test_a_journal_over_the_limit_fails_the_call_and_says_why() -> None:
    async with Environment(dispatch, replay="always", max_body_size=16_000_000) as env:
        info = await env.run(two_blobs)
    assert info.status is Status.PERMANENT_ERROR
    assert isinstance(info.error, errors.PermanentError)
    message = str(info.error)
    assert "HTTP 413" in message and "exceeds the limit of 16000000 bytes" in message
    assert "journal" in message and "by reference" in message
    assert "max_signed_body_size" in message


async def test_with_the_live_cache_only_new_results_travel() -> None:
    async with Environment(dispatch) as env:
        assert await env.call(two_blobs) == 20_000_000


@pytest.mark.parametrize("replay", ["cached", "always"])
async def test_a_gather_of_1200_calls_stays_within_the_protocol(replay: str) -> None:
    async with Environment(dispatch, replay=replay) as env:  # type: ignore[arg-type]
        assert await env.call(gather_1200) == sum(range(1200))
    polls = [r.poll for r in env.responses if r.HasField("poll")]
    assert all(1 <= p.min_results <= p.max_results <= 1000 for p in polls)


@dispatch.function
async def always_late() -> None:
    raise TimeoutError("late again")


async def test_max_attempts_counts_attempts_as_the_scheduler_does() -> None:
    async with Environment(dispatch, max_attempts=3, retry_delay=0.01) as env:
        info = await env.run(always_late)
    # Three attempts in all: the first and two retries, then the error is final.
    assert info.attempts == 2
    assert isinstance(info.error, TimeoutError)
    assert [r.status for r in env.responses] == [Status.TIMEOUT.value] * 3
