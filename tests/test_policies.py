"""Per-function policies: retries, attempt timeout, expiration, concurrency and rate.

Real SQLite files; the embedded scheduler (requests handed over in memory) and a
scheduler reaching the app over HTTP on loopback, restarted on its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from ports import free_port

import dispatch_aio
from dispatch_aio import Dispatch, RateLimit, RetryPolicy, Status
from dispatch_aio._policy import FunctionPolicy, apply_policy, describe_policy
from dispatch_aio.cli._console import Console
from dispatch_aio.cli._inspect import InspectClient, render_tree
from dispatch_aio.errors import DispatchTimeoutError, PermanentError
from dispatch_aio.proto.sdk.v1 import call_pb2
from dispatch_aio.proto.v1 import policy_pb2
from dispatch_aio.scheduler import Scheduler
from dispatch_aio.testing import Environment

API_KEY = "test-key"
FAST = {"initial_backoff": 0.01, "max_backoff": 0.02}


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) spans that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = top = 0
    for _, step in events:  # at a tie, an end (-1) sorts before a start
        now += step
        top = max(top, now)
    return top


async def until(predicate: object, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def http_app(scheduler: Scheduler, api_url: str, port: int) -> Dispatch:
    return Dispatch(
        api_key=API_KEY,
        api_url=api_url,
        endpoint_url=f"http://127.0.0.1:{port}",
        endpoint_addr=f"127.0.0.1:{port}",
        verification_key=scheduler.verification_key,
    )


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[Scheduler]:
    s = Scheduler(str(tmp_path / "calls.db"), api_key=API_KEY)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_a_function_limited_to_2_never_runs_3_over_http(scheduler: Scheduler) -> None:
    api_url = await scheduler.serve("127.0.0.1", 0)
    app = http_app(scheduler, api_url, free_port())
    spans: list[tuple[float, float]] = []

    @app.function(concurrency=2)
    async def work(i: int) -> int:
        start = time.monotonic()
        await asyncio.sleep(0.15)  # short: waited out live, the attempt stays in flight
        spans.append((start, time.monotonic()))
        return i

    async with await app.start():
        ids = [await work.dispatch(i) for i in range(6)]
        results = [await app.client.result(i, timeout=10) for i in ids]
    assert results == list(range(6))
    assert len(spans) == 6
    assert most_at_once(spans) == 2


async def test_a_rate_limit_spaces_the_starts(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    starts: list[float] = []

    @app.function(rate_limit=RateLimit(per_second=10, burst=1))
    async def tick(i: int) -> int:
        starts.append(time.monotonic())
        return i

    async with await app.start():
        ids = [await tick.dispatch(i) for i in range(5)]
        for dispatch_id in ids:
            await app.client.result(dispatch_id, timeout=10)
    starts.sort()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.08, gaps  # one token every 0.1 s, a little slack for timers


async def test_a_retry_policy_of_3_attempts_makes_exactly_3(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    attempts = {"flaky": 0, "picky": 0, "default": 0}

    @app.function(retry=RetryPolicy(max_attempts=3, **FAST))
    async def flaky() -> None:
        attempts["flaky"] += 1
        raise ConnectionError(f"attempt {attempts['flaky']} failed")

    # A status that is not retried by default, retried because the policy says so.
    @app.function(retry=RetryPolicy(max_attempts=2, retry_on=frozenset({Status.PERMANENT_ERROR})))
    async def picky() -> None:
        attempts["picky"] += 1
        raise PermanentError("no")

    @app.function
    async def default() -> None:
        attempts["default"] += 1
        raise PermanentError("no")

    async with await app.start():
        with pytest.raises(ConnectionError, match="attempt 3 failed"):
            await app.client.result(await flaky.dispatch(), timeout=10)
        with pytest.raises(PermanentError):
            await app.client.result(await picky.dispatch(), timeout=10)
        with pytest.raises(PermanentError):
            await app.client.result(await default.dispatch(), timeout=10)
    assert attempts == {"flaky": 3, "picky": 2, "default": 1}


async def test_an_attempt_timeout_counts_as_a_failed_attempt(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    started: list[float] = []

    @app.function(timeout=0.2, retry=RetryPolicy(max_attempts=2, **FAST))
    async def slow() -> str:
        started.append(time.monotonic())
        await asyncio.sleep(0.6)  # waited out live: longer than the attempt may take
        return "too late"

    async with await app.start():
        dispatch_id = await slow.dispatch()
        timed_out = r"outlived the function's timeout of 0\.2 s"
        with pytest.raises(DispatchTimeoutError, match=timed_out):
            await app.client.result(dispatch_id, timeout=10)
    assert len(started) == 2


async def test_an_expired_call_ends_with_a_timeout(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))

    @app.function(expiration=0.5)
    async def forever() -> None:
        await asyncio.sleep(3600)  # a durable timer: suspended until it expires

    async with await app.start():
        begun = time.monotonic()
        dispatch_id = await forever.dispatch()
        with pytest.raises(DispatchTimeoutError, match="the call expired"):
            await app.client.result(dispatch_id, timeout=10)
        assert time.monotonic() - begun < 3


async def test_a_restarted_scheduler_keeps_the_limit(tmp_path: Path) -> None:
    db = str(tmp_path / "calls.db")
    first = Scheduler(db, api_key=API_KEY)
    await first.start()
    api_url = await first.serve("127.0.0.1", 0)
    app = http_app(first, api_url, free_port())
    spans: list[tuple[float, float]] = []

    @app.function(concurrency=2)
    async def work(i: int) -> int:
        start = time.monotonic()
        await asyncio.sleep(0.15)
        spans.append((start, time.monotonic()))
        return i

    async with await app.start():
        ids = [await work.dispatch(i) for i in range(6)]
        await until(lambda: spans)  # some ran; the others wait, stored
        await first.close()
        await asyncio.sleep(0.3)  # attempts abandoned by the first scheduler end
        restarted = time.monotonic()
        # Nothing is submitted again: the limit comes from the database alone.
        second = Scheduler(db, api_key=API_KEY)
        await second.start()
        try:
            async with asyncio.timeout(10):
                results = [await second.wait(dispatch_id) for dispatch_id in ids]
            assert not any(r.HasField("error") for r in results)
        finally:
            await second.close()
    after = [span for span in spans if span[0] >= restarted]
    assert len(after) >= 2  # the calls left when the first scheduler stopped
    assert most_at_once(after) == 2


async def test_the_testing_environment_honours_the_retry_policy() -> None:
    app = Dispatch(env={})
    attempts: list[int] = []

    @app.function(retry=RetryPolicy(max_attempts=3))
    async def flaky() -> None:
        attempts.append(1)
        raise ConnectionError("down")

    async with Environment(app) as env:
        info = await env.run(flaky)
    assert len(attempts) == 3
    assert isinstance(info.error, ConnectionError)


async def test_the_testing_environment_honours_concurrency_and_rate() -> None:
    app = Dispatch(env={})
    spans: list[tuple[float, float]] = []
    starts: list[float] = []

    @app.function(concurrency=2)
    def blocking(x: int) -> int:  # a plain def: its attempt lasts while it sleeps
        start = time.monotonic()
        time.sleep(0.05)
        spans.append((start, time.monotonic()))
        return x

    @app.function(rate_limit=RateLimit(per_second=1, burst=1))
    async def tick(i: int) -> int:
        starts.append(dispatch_aio.now().timestamp())
        return i

    @app.function
    async def fan() -> list[int]:
        firsts = await asyncio.gather(*(blocking(i) for i in range(6)))
        return firsts + list(await asyncio.gather(*(tick(i) for i in range(3))))

    async with Environment(app) as env:
        info = await env.run(fan)
    assert info.output == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert most_at_once(spans) == 2 and len(spans) == 6
    # One start per second of the environment's clock (virtual: no real waiting).
    assert [round(t - starts[0]) for t in sorted(starts)] == [0, 1, 2]


def test_policies_are_checked_at_decoration() -> None:
    app = Dispatch(env={})
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        app.function(timeout=0)
    with pytest.raises(ValueError, match="concurrency must be a positive int"):
        app.function(concurrency=0)
    with pytest.raises(TypeError, match=r"retry_on must be a frozenset of dispatch_aio\.Status"):
        RetryPolicy(retry_on=frozenset({"TIMEOUT"}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jitter must be between 0 and 1"):
        RetryPolicy(jitter=2)
    with pytest.raises(ValueError, match="per_second must be positive"):
        RateLimit(per_second=0)


async def test_an_invalid_policy_is_refused_at_submission(scheduler: Scheduler) -> None:
    backwards = policy_pb2.RetryPolicy(initial_backoff=5, max_backoff=1)
    call = call_pb2.Call(
        function="f",
        endpoint="http://127.0.0.1:9",
        policy=policy_pb2.FunctionPolicy(retry=backwards),
    )
    with pytest.raises(ValueError, match=r"calls\[0\]\.policy is invalid: RetryPolicy needs"):
        await scheduler.dispatch([call])


async def test_calls_made_by_a_function_carry_the_policy(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    spans: list[tuple[float, float]] = []
    attempts: list[int] = []

    @app.function(concurrency=2)
    async def work(i: int) -> int:
        start = time.monotonic()
        await asyncio.sleep(0.1)
        spans.append((start, time.monotonic()))
        return i

    @app.function(retry=RetryPolicy(max_attempts=2, **FAST))
    async def flaky() -> None:
        attempts.append(1)
        raise ConnectionError("down")

    @app.function
    async def fan_out() -> list[int]:
        with contextlib.suppress(ConnectionError):
            await flaky()
        return list(await asyncio.gather(*(work(i) for i in range(6))))

    async with await app.start():
        assert await app.client.result(await fan_out.dispatch(), timeout=10) == list(range(6))
    assert most_at_once(spans) == 2
    assert len(attempts) == 2


async def test_show_and_the_ui_say_what_a_call_s_policy_sets(scheduler: Scheduler) -> None:
    api_url = await scheduler.serve("127.0.0.1", 0)
    policy = FunctionPolicy(
        retry=RetryPolicy(max_attempts=3, initial_backoff=1, max_backoff=60, multiplier=2),
        timeout=30,
        concurrency=2,
        rate_limit=RateLimit(per_second=5, burst=10),
    )
    call = call_pb2.Call(function="f", endpoint="http://127.0.0.1:9")
    apply_policy(call, policy)
    (dispatch_id,) = await scheduler.dispatch([call])
    expected = (
        "retry 3 attempts, backoff 1 to 60 s x2; timeout 30 s per attempt; at most 2 at "
        "once; 5 starts/s (burst 10)"
    )
    assert describe_policy(policy.to_proto()) == expected
    async with InspectClient(api_url, API_KEY) as client:
        tree = await client.get_call(dispatch_id)
    assert describe_policy(tree.call.policy) == expected
    out = io.StringIO()
    console = Console(out, io.StringIO(), color=False, live=False)
    assert f"policy: {expected}" in "\n".join(render_tree(tree, console))
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with http.get(f"{api_url}/ui/api/calls/{dispatch_id}", headers=headers) as resp:
            assert (await resp.json())["call"]["policy"] == expected
