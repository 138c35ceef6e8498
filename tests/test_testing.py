"""dispatch_aio.testing: the in-process environment for users' tests."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatch_aio import Dispatch, durable
from dispatch_aio.errors import NondeterminismError, PermanentError, ThrottledError
from dispatch_aio.testing import Environment, check_determinism, check_journals

dispatch = Dispatch()


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


@dispatch.function
async def publish(message: str) -> str:
    raise PermanentError("no network in tests")


@dispatch.function
async def weekly_digest(weeks: int) -> list[int]:
    sent = []
    for week in range(weeks):
        await asyncio.sleep(7 * 24 * 3600)
        sent.append(await double(week))
    return sent


@dispatch.function
async def announce(message: str) -> str:
    return await publish(message)


@dispatch.function
async def fan(n: int) -> list[int]:
    return list(await asyncio.gather(*(double(i) for i in range(n))))


# weekly_digest sleeps for weeks: past the 7 days after which a call expires, unless it is
# submitted with a longer expiration (Call.expiration), as these tests assume.
WEEKS = 60 * 24 * 3600.0


async def test_week_long_sleep_runs_instantly() -> None:
    started = time.monotonic()
    async with Environment(dispatch, expiration=WEEKS) as env:
        before = env.time()
        assert await env.call(weekly_digest, 3) == [0, 2, 4]
        assert env.time() - before >= 3 * 7 * 24 * 3600
    assert time.monotonic() - started < 2


async def test_stub_fails_twice_then_succeeds() -> None:
    attempts = []

    async def flaky_publish(message: str) -> str:
        attempts.append(message)
        if len(attempts) <= 2:
            raise ThrottledError("slow down")
        return f"published {message}"

    async with Environment(dispatch) as env:
        env.stub(publish, flaky_publish)
        assert await env.call(announce, "hello") == "published hello"
        [call] = env.calls(publish)
        assert call.attempts == 2
        assert call.status is not None and call.status.name == "OK"
        assert attempts == ["hello"] * 3


async def test_errors_raise_and_are_inspectable() -> None:
    async with Environment(dispatch) as env:
        with pytest.raises(PermanentError, match="no network"):
            await env.call(announce, "hello")
        [root] = env.calls(announce)
        [child] = root.children
        assert child.function == "publish"
        assert child.args == ("hello",)
        assert isinstance(child.error, PermanentError)
        assert child.attempts == 0


async def test_call_tree_counts() -> None:
    async with Environment(dispatch, replay="always", shuffle=True, split=True) as env:
        assert await env.call(fan, 5) == [0, 2, 4, 6, 8]
        assert len(env.calls(double)) == 5
        [root] = env.calls(fan)
        assert sorted(c.args[0] for c in root.children) == [0, 1, 2, 3, 4]
        assert root.rounds >= 2


@dispatch.function
async def stamped() -> int:
    # Deliberately non-deterministic: a call's input taken from the clock.
    first = await double(time.monotonic_ns() % 1_000_000)
    return first + await double(1)


async def test_nondeterminism_caught() -> None:
    # The detection names the read and its line before any replay diverges.
    with pytest.raises(
        NondeterminismError, match=r"time\.monotonic_ns\(\) at \S*test_testing\.py:"
    ):
        await check_determinism(dispatch, stamped)


async def test_nondeterminism_caught_by_replay_without_detection() -> None:
    with pytest.raises(NondeterminismError, match="diverged from its journal") as info:
        async with Environment(dispatch, replay="always", nondeterminism="off") as env:
            await env.call(stamped)
    assert "test_testing.py:" in str(info.value)


async def test_check_determinism_passes_for_deterministic_code() -> None:
    assert await check_determinism(dispatch, fan, 4) == [0, 2, 4, 6]


async def test_check_journals() -> None:
    async with Environment(dispatch, journal="whole") as env:
        await env.call(fan, 3)
        states = [
            (f"round {i}", r.poll.typed_coroutine_state.value)
            for i, r in enumerate(env.responses)
            if r.WhichOneof("directive") == "poll"
        ]
    assert states
    reports = await check_journals(dispatch, states)
    assert all(r.ok for r in reports)

    other = Dispatch()

    @other.function(name="fan")
    async def fan_changed(n: int) -> list[int]:
        return [await double(i + 1) for i in range(n)]

    @other.function(name="double")
    async def double_again(x: int) -> int:
        return 2 * x

    reports = await check_journals(other, states)
    assert not any(r.ok for r in reports)
    assert all(r.function == "fan" for r in reports)
    assert "diverged" in (reports[0].problem or "")


async def test_now_moves_with_virtual_time() -> None:
    @dispatch.function(name="sleeper")
    async def sleeper() -> float:
        start = durable.now()
        await asyncio.sleep(3600)
        return (durable.now() - start).total_seconds()

    async with Environment(dispatch) as env:
        assert await env.call(sleeper) >= 3600


@dispatch.function
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@dispatch.function
async def impatient(n: int) -> int:
    # Returns while its children still sleep: they are in flight when the call ends.
    naps = [asyncio.ensure_future(nap(3600 + i)) for i in range(n)]
    done, _ = await asyncio.wait(naps, timeout=60)
    return len(done)


async def test_environments_leave_no_tasks_behind() -> None:
    """Each environment closes with children in flight; the next one still runs on time."""
    started = time.monotonic()
    for i in range(100):
        replay = "always" if i % 2 else "cached"
        async with Environment(dispatch, replay=replay, expiration=WEEKS) as env:
            assert await env.call(impatient, 3) == 0
            assert await env.call(weekly_digest, 1) == [0]  # a timer after the leftovers
        assert asyncio.all_tasks() == {asyncio.current_task()}, i
    assert time.monotonic() - started < 30


async def test_environments_side_by_side_on_one_loop() -> None:
    # Each clock's jumper waits for the loop to be idle; the other's jumper is no work.
    async with (
        Environment(dispatch, expiration=WEEKS) as first,
        Environment(dispatch, replay="always", expiration=WEEKS) as second,
    ):
        results = await asyncio.wait_for(
            asyncio.gather(first.call(weekly_digest, 2), second.call(weekly_digest, 2)), 10
        )
    assert results == [[0, 2], [0, 2]]
