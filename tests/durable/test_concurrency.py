"""asyncio primitives inside durable functions: same results live, replayed and shuffled."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from dispatch_aio._function import Function
from dispatch_aio.errors import RemoteError

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


async def _fail(message: str) -> None:
    raise ValueError(message)


async def _slow(x: int) -> int:
    await asyncio.sleep(0.01)  # not durable: plain I/O-free wait in the child
    return x


double = Function(_double, name="double")
fail = Function(_fail, name="fail")
slow = Function(_slow, name="slow")


async def _two_doubles(x: int) -> int:
    a = await double(x)
    b = await double(a)
    return b


two_doubles = Function(_two_doubles, name="two_doubles")


async def _nested(n: int) -> list[int]:
    # gather over coroutines that themselves make calls, and a nested fan-out
    return list(await asyncio.gather(*(two_doubles(i) for i in range(n))))


nested = Function(_nested, name="nested")


async def _inner_gather(n: int) -> list[int]:
    async def pair(i: int) -> int:
        a, b = await asyncio.gather(double(i), double(i + 1))
        return a + b

    return list(await asyncio.gather(*(pair(i) for i in range(n))))


inner_gather = Function(_inner_gather, name="inner_gather")


async def test_gather_of_coroutines_making_calls(make_env: EnvFactory) -> None:
    env = make_env(double, two_doubles, nested)
    assert await env.call(nested, 6) == [4 * i for i in range(6)]


async def test_nested_gather_in_tasks(make_env: EnvFactory) -> None:
    env = make_env(double, inner_gather)
    assert await env.call(inner_gather, 5) == [4 * i + 2 for i in range(5)]


async def _gather_exceptions() -> list[Any]:
    results = await asyncio.gather(double(1), fail("boom"), double(3), return_exceptions=True)
    return [r if not isinstance(r, BaseException) else f"{type(r).__name__}:{r}" for r in results]


gather_exceptions = Function(_gather_exceptions, name="gather_exceptions")


async def test_gather_return_exceptions(make_env: EnvFactory) -> None:
    env = make_env(double, fail, gather_exceptions)
    assert await env.call(gather_exceptions) == [2, "ValueError:boom", 6]


async def _error_propagates() -> str:
    try:
        await fail("bad input")
    except ValueError as exc:
        return f"caught {exc}"
    return "not raised"


error_propagates = Function(_error_propagates, name="error_propagates")


async def test_call_error_raised_at_await(make_env: EnvFactory) -> None:
    env = make_env(fail, error_propagates)
    assert await env.call(error_propagates) == "caught bad input"


async def _uncaught() -> None:
    await fail("nope")


uncaught = Function(_uncaught, name="uncaught")


async def test_uncaught_error_fails_the_caller(make_env: EnvFactory) -> None:
    env = make_env(fail, uncaught)
    info = await env.run(uncaught)
    assert info.status is not None
    assert info.status.name == "INVALID_ARGUMENT"
    assert isinstance(info.error, ValueError)
    assert str(info.error) == "nope"


async def _tasks(n: int) -> list[int]:
    tasks = [asyncio.create_task(double(i)) for i in range(n)]
    extra = asyncio.create_task(two_doubles(10))
    return [await t for t in tasks] + [await extra]


tasks_fn = Function(_tasks, name="tasks")


async def test_create_task(make_env: EnvFactory) -> None:
    env = make_env(double, two_doubles, tasks_fn)
    assert await env.call(tasks_fn, 4) == [0, 2, 4, 6, 40]


async def _wait_modes(mode: str) -> list[Any]:
    tasks = [asyncio.create_task(double(i)) for i in range(5)]
    if mode == "FIRST_EXCEPTION":
        tasks.append(asyncio.create_task(fail("x")))
    done, pending = await asyncio.wait(tasks, return_when=getattr(asyncio, mode))
    # Order of set iteration must replay identically: record it.
    order = [tasks.index(t) for t in done]
    for t in pending:
        t.cancel()
    outcome = []
    for t in done:
        outcome.append(repr(t.exception()) if t.exception() else t.result())
    return [sorted(order) == order or order, len(done) + len(pending), outcome]


wait_modes = Function(_wait_modes, name="wait_modes")


@pytest.mark.parametrize("when", ["FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"])
async def test_wait(make_env: EnvFactory, when: str) -> None:
    env = make_env(double, fail, wait_modes)
    result = await env.call(wait_modes, when)
    assert result[1] == (6 if when == "FIRST_EXCEPTION" else 5)
    if when == "ALL_COMPLETED":
        assert sorted(result[2]) == [0, 2, 4, 6, 8]
    else:
        assert len(result[2]) >= 1
    # The same run again gives the same answer (determinism within a mode).
    again = make_env(double, fail, wait_modes)
    assert await again.call(wait_modes, when) == result


async def _as_completed(n: int) -> list[int]:
    out = []
    for next_done in asyncio.as_completed([double(i) for i in range(n)]):
        out.append(await next_done)
    return out


as_completed_fn = Function(_as_completed, name="as_completed_fn")


async def test_as_completed(make_env: EnvFactory) -> None:
    env = make_env(double, as_completed_fn)
    result = await env.call(as_completed_fn, 8)
    assert sorted(result) == [2 * i for i in range(8)]


async def _task_group() -> str:
    started = []

    async def child(i: int) -> int:
        started.append(i)
        return await double(i)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(child(1))
            tg.create_task(fail("group child failed"))
            tg.create_task(child(2))
    except ExceptionGroup as group:
        return f"{type(group).__name__}: {[str(e) for e in group.exceptions]} started={started}"
    return "no error"


task_group = Function(_task_group, name="task_group")


async def test_task_group_failing_child(make_env: EnvFactory) -> None:
    env = make_env(double, fail, task_group)
    result = await env.call(task_group)
    assert result.startswith("ExceptionGroup: ['group child failed']")


async def _cancel_blocked() -> str:
    task = asyncio.create_task(slow(5))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # A second call made after the cancellation still works; the late result of
    # the first is ignored.
    return f"cancelled={task.cancelled()} then {await double(21)}"


cancel_blocked = Function(_cancel_blocked, name="cancel_blocked")


async def test_cancel_task_blocked_on_call(make_env: EnvFactory) -> None:
    env = make_env(slow, double, cancel_blocked)
    assert await env.call(cancel_blocked) == "cancelled=True then 42"


async def _rejected() -> str:
    try:
        await double(1)
    except RemoteError as exc:
        first = f"rejected: {exc.message}"
    else:
        first = "accepted"
    return f"{first}; then {await double(2)}"


rejected = Function(_rejected, name="rejected")


async def test_poll_error_raised_in_caller(make_env: EnvFactory) -> None:
    env = make_env(double, rejected)
    env.reject_calls(rejected, message="calls rejected by the test scheduler")
    assert await env.call(rejected) == "rejected: calls rejected by the test scheduler; then 4"


async def _fire_and_forget(x: int) -> str:
    async def notify() -> None:
        await double(x)  # made, never sent: the function returns first

    asyncio.create_task(notify())  # noqa: RUF006
    return "done"


fire_and_forget = Function(_fire_and_forget, name="fire_and_forget")


# Not with a new interpreter per request: it would log there, not here.
@pytest.mark.parametrize("mode", ["live", "replay", "shuffle"])
async def test_tasks_left_running_at_return_are_named(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(double, fire_and_forget)
    with caplog.at_level("WARNING", logger="dispatch_aio"):
        assert await env.call(fire_and_forget, 4) == "done"
    [warning] = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert "notify" in warning
    assert "'double'" in warning
    assert len(env.calls(double)) == 0  # cancelled at the return, as asyncio.run() does
