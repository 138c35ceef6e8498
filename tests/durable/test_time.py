"""Durable time: sleeps, timeouts, wait_for; now(), random(), uuid4() replay identically."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from dispatch_aio import durable
from dispatch_aio._function import Function

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _slow_double(x: int) -> int:
    await asyncio.sleep(3)  # a durable sleep of its own, longer than the live threshold
    return 2 * x


slow_double = Function(_slow_double, name="slow_double")


async def _long_sleep(seconds: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.sleep(seconds)
    return loop.time() - start


long_sleep = Function(_long_sleep, name="long_sleep")


async def test_long_sleep_suspends_with_max_wait(make_env: EnvFactory) -> None:
    env = make_env(long_sleep)
    started = time.monotonic()
    elapsed = await env.call(long_sleep, 3600.0)
    assert time.monotonic() - started < 5, "virtual time: an hour passes instantly"
    assert elapsed >= 3600.0
    polls = [r.poll for r in env.responses if r.WhichOneof("directive") == "poll"]
    assert len(polls) == 1
    assert not polls[0].calls
    assert 3599 <= polls[0].max_wait.ToTimedelta().total_seconds() <= 3601


async def test_short_sleep_stays_live(make_env: EnvFactory) -> None:
    env = make_env(long_sleep, virtual_time=False)
    elapsed = await env.call(long_sleep, 0.05)
    assert elapsed >= 0.05
    assert all(r.WhichOneof("directive") == "exit" for r in env.responses)


async def _sleeps_and_calls() -> list[int]:
    out = []
    for i in range(3):
        await asyncio.sleep(10)
        out.append(await double(i))
    return out


sleeps_and_calls = Function(_sleeps_and_calls, name="sleeps_and_calls")


async def test_sleeps_between_calls(make_env: EnvFactory) -> None:
    env = make_env(double, sleeps_and_calls)
    assert await env.call(sleeps_and_calls) == [0, 2, 4]


async def _timeout_call(seconds: float) -> str:
    try:
        async with asyncio.timeout(seconds):
            result = await slow_double(4)
    except TimeoutError:
        return "timed out"
    return f"result {result}"


timeout_call = Function(_timeout_call, name="timeout_call")


async def test_timeout_around_call(make_env: EnvFactory) -> None:
    env = make_env(slow_double, timeout_call)
    assert await env.call(timeout_call, 10.0) == "result 8"
    env = make_env(slow_double, timeout_call)
    assert await env.call(timeout_call, 1.5) == "timed out"


async def _wait_for_call(seconds: float) -> str:
    try:
        return f"result {await asyncio.wait_for(slow_double(5), seconds)}"
    except TimeoutError:
        return "timed out"


wait_for_call = Function(_wait_for_call, name="wait_for_call")


async def test_wait_for_around_call(make_env: EnvFactory) -> None:
    env = make_env(slow_double, wait_for_call)
    assert await env.call(wait_for_call, 60.0) == "result 10"
    env = make_env(slow_double, wait_for_call)
    assert await env.call(wait_for_call, 1.5) == "timed out"


async def _helpers() -> list[object]:
    before = (durable.now(), durable.random(), durable.uuid4())
    await double(1)
    after = (durable.now(), durable.random(), durable.uuid4())
    return [*before, *after]


helpers = Function(_helpers, name="helpers")


async def test_deterministic_helpers(make_env: EnvFactory) -> None:
    env = make_env(double, helpers)
    t1, r1, u1, t2, r2, u2 = await env.call(helpers)
    assert t1 <= t2 and t1.tzinfo is not None
    assert r1 != r2 and 0 <= r1 < 1
    assert u1 != u2 and u1.version == 4


async def _draws_before_a_call() -> list[int]:
    # Drawn before the call and drawn again by every replay of this run, in whichever
    # process resumes it: the call's input is the first draw, its result comes back in
    # a later round, so the two agree only if every replay draws what the first did.
    drawn = [int(durable.random() * 1e9), durable.uuid4().int % 10**9]
    sent = await asyncio.gather(*(double(n) for n in drawn))
    return [*drawn, *sent]


draws_before_a_call = Function(_draws_before_a_call, name="draws_before_a_call")


async def test_random_values_drawn_before_a_call_are_drawn_again_on_resume(
    make_env: EnvFactory,
) -> None:
    env = make_env(double, draws_before_a_call)
    r, u, r2, u2 = await env.call(draws_before_a_call)
    assert [r2, u2] == [2 * r, 2 * u]
    assert r != u


async def _observes_replay() -> list[object]:
    seen = [durable.now().timestamp(), durable.random()]
    await asyncio.sleep(5)
    seen += [durable.now().timestamp(), durable.random()]
    await double(0)
    return seen


observes_replay = Function(_observes_replay, name="observes_replay")


@pytest.mark.parametrize("mode", ["replay"])
async def test_replay_sees_recorded_values(make_env: EnvFactory) -> None:
    # With the cache off, each round replays; values computed before a
    # suspension must be those of the first execution, or the call inputs and
    # results below would diverge.
    env = make_env(double, observes_replay)
    t1, r1, t2, r2 = await env.call(observes_replay)
    assert t2 - t1 >= 5
    assert r1 != r2


log = durable.get_logger("tests.durable.workflow")


async def _logs() -> int:
    log.info("starting")
    first = await double(1)
    log.info("got %d", first)
    return first + await double(2)


logs = Function(_logs, name="logs")


async def test_logger_quiet_while_replaying(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(double, logs)
    with caplog.at_level("INFO", logger="tests.durable.workflow"):
        assert await env.call(logs) == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.durable.workflow"]
    # Each line once, however many times the function was replayed.
    assert lines == ["starting", "got 2"]


async def _agen_consumer(n: int) -> list[int]:
    async def doubles(k: int):  # type: ignore[no-untyped-def]
        for i in range(k):
            yield await double(i)

    out = [x async for x in doubles(n)]
    # An async generator left unfinished must not break the run either.
    gen = doubles(n)
    out.append(await gen.__anext__())
    await gen.aclose()
    return out


agen_consumer = Function(_agen_consumer, name="agen_consumer")


async def test_async_generators(make_env: EnvFactory) -> None:
    env = make_env(double, agen_consumer)
    assert await env.call(agen_consumer, 3) == [0, 2, 4, 0]


async def _echo(x: float) -> float:
    return x


echo = Function(_echo, name="echo")


async def _time_as_input() -> list[float]:
    loop = asyncio.get_running_loop()
    first = await echo(durable.now().timestamp())
    second = await echo(loop.time())
    sum(range(100_000))  # some work: time must not move while the function computes
    third = await echo(loop.time())
    fourth = await echo(durable.now().timestamp())
    return [first, second, third, fourth]


time_as_input = Function(_time_as_input, name="time_as_input")


async def test_time_read_between_durable_points_replays_identically(make_env: EnvFactory) -> None:
    # On the real clock: the time the function reads must be the journaled one, or a
    # replay would send calls with other inputs than the journal recorded.
    env = make_env(echo, time_as_input, virtual_time=False)
    first, second, third, fourth = await env.call(time_as_input)
    # now() is wall-clock time, loop.time() on the scale of time.monotonic().
    assert first <= fourth and second <= third


async def _io_then_time() -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.to_thread(time.sleep, 0.2)
    return loop.time() - start  # I/O in flight: durable time followed the wall clock


io_then_time = Function(_io_then_time, name="io_then_time")


async def test_time_moves_while_io_is_in_flight(make_env: EnvFactory) -> None:
    env = make_env(io_then_time, virtual_time=False)
    # Not frozen (it would be 0); a little less than the sleep, since the clock of I/O
    # time starts once the operation is handed to the host loop.
    assert await env.call(io_then_time) >= 0.15


async def _background_sleeps_forever(x: int) -> int:
    forever = asyncio.create_task(asyncio.sleep(math.inf))
    result = await double(x)  # suspends while the infinite timer is pending
    forever.cancel()
    return result


background_sleeps_forever = Function(_background_sleeps_forever, name="background_sleeps_forever")


async def test_an_infinite_sleep_never_fires(make_env: EnvFactory) -> None:
    env = make_env(double, background_sleeps_forever)
    assert await env.call(background_sleeps_forever, 21) == 42
    polls = [r.poll for r in env.responses if r.WhichOneof("directive") == "poll"]
    assert polls and not any(p.HasField("max_wait") for p in polls)


async def _sleeps_forever() -> None:
    await asyncio.sleep(math.inf)


sleeps_forever = Function(_sleeps_forever, name="sleeps_forever")


async def test_only_an_infinite_sleep_left_is_an_error(make_env: EnvFactory) -> None:
    env = make_env(sleeps_forever)
    info = await env.run(sleeps_forever)
    assert info.status is not None and info.status.name == "PERMANENT_ERROR"
    assert "never fires" in str(info.error)


async def _deadline_from_monotonic() -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    skew = loop.time() - time.monotonic()
    # As on asyncio's default loop, loop.time() is on the scale of time.monotonic().
    async with asyncio.timeout_at(time.monotonic() + 30):
        return await double(1), skew


deadline_from_monotonic = Function(_deadline_from_monotonic, name="deadline_from_monotonic")


async def test_loop_time_is_on_the_monotonic_scale(make_env: EnvFactory) -> None:
    # Reading time.monotonic() in a function is what the detection reports: here on purpose.
    env = make_env(double, deadline_from_monotonic, virtual_time=False, nondeterminism="off")
    result, skew = await env.call(deadline_from_monotonic)
    assert result == 2
    assert abs(skew) < 5
