"""Journal handling: divergence, unusable states, the live cache, tail calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from google.protobuf import any_pb2

from dispatch_aio import _codec
from dispatch_aio._function import Function
from dispatch_aio._status import Status
from dispatch_aio.durable import JOURNAL_TYPE_URL, Run, Runner
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, poll_pb2
from dispatch_aio.proto.v1 import journal_pb2

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


async def _triple(x: int) -> int:
    return 3 * x


double = Function(_double, name="double")
triple = Function(_triple, name="triple")


def _runner(*functions: Function[Any, Any], cache_size: int = 0) -> Runner:
    table = {f.name: f.fn for f in functions}

    def lookup(name: str) -> Callable[..., Awaitable[Any]] | None:
        return table.get(name)

    return Runner(lookup, cache_size=cache_size)


async def _first_poll(runner: Runner, name: str, *args: Any) -> function_pb2.RunResponse:
    req = function_pb2.RunRequest(function=name, input=_codec.encode_input(args, {}))
    resp = await runner.run(req)
    assert resp.WhichOneof("directive") == "poll", resp
    return resp


def _resume(name: str, poll: poll_pb2.Poll, results: dict[int, Any]) -> function_pb2.RunRequest:
    out = poll_pb2.PollResult(typed_coroutine_state=poll.typed_coroutine_state)
    for cid, value in results.items():
        out.results.append(
            call_pb2.CallResult(correlation_id=cid, output=_codec.encode_value(value))
        )
    return function_pb2.RunRequest(function=name, poll_result=out)


def _versions(
    body_a: Callable[[], Awaitable[Any]], body_b: Callable[[], Awaitable[Any]]
) -> tuple[Function[[], Any], Function[[], Any]]:
    return Function(body_a, name="workflow"), Function(body_b, name="workflow")


DEADLINE = [0.0]


async def _branch_on_time() -> int:
    if time.time() < DEADLINE[0]:
        return await double(1)
    return await triple(1)


async def _calls_in_order() -> int:
    a = await double(1)
    b = await triple(2)
    return a + b


async def _calls_reordered() -> int:
    b = await triple(2)
    a = await double(1)
    return a + b


async def _other_argument() -> int:
    a = await double(5)
    b = await triple(2)
    return a + b


async def _fewer_calls() -> int:
    return 7


@pytest.mark.parametrize(
    ("version_a", "version_b", "expect"),
    [
        (_calls_in_order, _calls_reordered, "'double'"),
        (_calls_in_order, _other_argument, "input sha256"),
        (_calls_in_order, _fewer_calls, "no longer makes"),
    ],
)
async def test_divergence_reported(
    version_a: Callable[[], Awaitable[Any]], version_b: Callable[[], Awaitable[Any]], expect: str
) -> None:
    a, b = _versions(version_a, version_b)
    poll = (await _first_poll(_runner(a, double, triple), "workflow")).poll
    resp = await _runner(b, double, triple).run(_resume("workflow", poll, {1: 2}))
    assert resp.status == Status.INCOMPATIBLE_STATE
    error = resp.exit.result.error
    assert error.type == "NondeterminismError"
    assert "diverged from its journal" in error.message
    assert expect in error.message
    assert "test_journal.py:" in error.message, "the report names the call site"


async def test_divergence_from_branching_on_time() -> None:
    fn = Function(_branch_on_time, name="workflow")
    DEADLINE[0] = time.time() + 3600
    poll = (await _first_poll(_runner(fn, double, triple), "workflow")).poll
    assert poll.calls[0].function == "double"
    DEADLINE[0] = 0.0  # time "moved on": the same code now takes the other branch
    resp = await _runner(fn, double, triple).run(_resume("workflow", poll, {1: 2}))
    assert resp.status == Status.INCOMPATIBLE_STATE
    message = resp.exit.result.error.message
    assert "'double'" in message and "'triple'" in message


async def test_recorded_call_no_longer_made() -> None:
    async def two_calls() -> list[int]:
        a = await double(1)
        return [a, await double(2)]

    async def one_call() -> list[int]:
        a = await double(1)
        return [a, await triple(2)]

    a, b = _versions(two_calls, one_call)
    runner_a = _runner(a, double, triple)
    poll = (await _first_poll(runner_a, "workflow")).poll
    second = (await runner_a.run(_resume("workflow", poll, {1: 2}))).poll
    resp = await _runner(b, double, triple).run(_resume("workflow", second, {}))
    assert resp.status == Status.INCOMPATIBLE_STATE
    assert "call 0#1" in resp.exit.result.error.message


def _state_request(
    state: any_pb2.Any | bytes | None, function: str = "workflow"
) -> function_pb2.RunRequest:
    result = poll_pb2.PollResult()
    if isinstance(state, bytes):
        result.coroutine_state = state
    elif state is not None:
        result.typed_coroutine_state.CopyFrom(state)
    return function_pb2.RunRequest(function=function, poll_result=result)


async def _journal_state(**fields: Any) -> any_pb2.Any:
    fn = Function(_calls_in_order, name="workflow")
    poll = (await _first_poll(_runner(fn, double, triple), "workflow")).poll
    journal = journal_pb2.Journal.FromString(poll.typed_coroutine_state.value)
    for key, value in fields.items():
        setattr(journal, key, value)
    return any_pb2.Any(type_url=JOURNAL_TYPE_URL, value=journal.SerializeToString())


@pytest.mark.parametrize(
    ("make_state", "expect"),
    [
        (lambda: None, "no coroutine state"),
        (lambda: b"\x80\x04legacy", "legacy bytes"),
        (
            lambda: any_pb2.Any(
                type_url="buf.build/stealthrocket/coroutine/coroutine.v1.State", value=b"x"
            ),
            "another SDK",
        ),
        (lambda: any_pb2.Any(type_url=JOURNAL_TYPE_URL, value=b"\xff\xff\xff"), "corrupt"),
    ],
)
async def test_unusable_state(make_state: Callable[[], Any], expect: str) -> None:
    fn = Function(_calls_in_order, name="workflow")
    resp = await _runner(fn).run(_state_request(make_state()))
    assert resp.status == Status.INCOMPATIBLE_STATE
    assert expect in resp.exit.result.error.message


async def test_future_version_and_other_function() -> None:
    fn = Function(_calls_in_order, name="workflow")
    runner = _runner(fn, double, triple)
    resp = await runner.run(_state_request(await _journal_state(version=99)))
    assert resp.status == Status.INCOMPATIBLE_STATE
    assert "version 99" in resp.exit.result.error.message
    resp = await runner.run(_state_request(await _journal_state(function="other")))
    assert resp.status == Status.INCOMPATIBLE_STATE
    assert "belongs to function 'other'" in resp.exit.result.error.message


async def test_unknown_function_and_bad_input() -> None:
    runner = _runner(double)
    resp = await runner.run(function_pb2.RunRequest(function="nope", input=_codec.encode_value(1)))
    assert resp.status == Status.NOT_FOUND
    bad = any_pb2.Any(type_url="type.googleapis.com/no.such.Type", value=b"")
    resp = await runner.run(function_pb2.RunRequest(function="double", input=bad))
    assert resp.status == Status.INVALID_ARGUMENT
    assert "no.such.Type" in resp.exit.result.error.message
    resp = await runner.run(
        function_pb2.RunRequest(function="double", input=_codec.encode_input((1, 2), {}))
    )
    assert resp.status == Status.INVALID_ARGUMENT
    assert resp.exit.result.error.type == "TypeError"


EXECUTIONS = [0]


async def _counted() -> int:
    EXECUTIONS[0] += 1
    a = await double(1)
    return a + await double(2)


async def test_live_cache_avoids_replay() -> None:
    fn = Function(_counted, name="workflow")
    for cache_size, expected in ((8, 1), (0, 3)):
        EXECUTIONS[0] = 0
        runner = _runner(fn, double, cache_size=cache_size)
        poll = (await _first_poll(runner, "workflow")).poll
        poll = (await runner.run(_resume("workflow", poll, {1: 2}))).poll
        resp = await runner.run(_resume("workflow", poll, {2: 4}))
        assert _codec.decode_value(resp.exit.result.output) == 6
        assert EXECUTIONS[0] == expected
        await runner.aclose()


async def test_stale_state_replays_instead_of_using_the_cache() -> None:
    fn = Function(_counted, name="workflow")
    EXECUTIONS[0] = 0
    runner = _runner(fn, double, cache_size=8)
    first = (await _first_poll(runner, "workflow")).poll
    second = (await runner.run(_resume("workflow", first, {1: 2}))).poll
    # The scheduler retries the earlier resume (say its answer was lost): the
    # cached run is a round ahead, so this one replays from the state.
    again = (await runner.run(_resume("workflow", first, {1: 2}))).poll
    assert EXECUTIONS[0] == 2
    assert [c.function for c in again.calls] == [c.function for c in second.calls]
    resp = await runner.run(_resume("workflow", again, {2: 4}))
    assert _codec.decode_value(resp.exit.result.output) == 6
    await runner.aclose()


async def test_duplicate_and_unknown_results_ignored() -> None:
    fn = Function(_counted, name="workflow")
    runner = _runner(fn, double, cache_size=8)
    poll = (await _first_poll(runner, "workflow")).poll
    req = _resume("workflow", poll, {1: 2})
    req.poll_result.results.append(
        call_pb2.CallResult(correlation_id=1, output=_codec.encode_value(100))
    )
    req.poll_result.results.append(
        call_pb2.CallResult(correlation_id=77, output=_codec.encode_value(5))
    )
    poll = (await runner.run(req)).poll
    resp = await runner.run(_resume("workflow", poll, {2: 4, 1: 50}))
    assert _codec.decode_value(resp.exit.result.output) == 6
    await runner.aclose()


async def _countdown(n: int) -> str:
    if n == 0:
        return "liftoff"
    await double(n)
    countdown.tail_call(n - 1)


countdown = Function(_countdown, name="countdown")


async def test_tail_call(make_env: EnvFactory) -> None:
    env = make_env(double, countdown)
    assert await env.call(countdown, 3) == "liftoff"
    tails = [r.exit.tail_call for r in env.responses if r.exit.HasField("tail_call")]
    assert [t.function for t in tails] == ["countdown"] * 3
    assert [_codec.decode_input(t.input) for t in tails] == [((2,), {}), ((1,), {}), ((0,), {})]
    assert all(r.status == Status.OK for r in env.responses)


async def test_tail_call_outside_a_run() -> None:
    with pytest.raises(RuntimeError, match="only valid inside a durable function"):
        countdown.tail_call(1)


async def test_none_result_sends_no_output() -> None:
    async def nothing() -> None:
        await double(1)

    fn = Function(nothing, name="workflow")
    runner = _runner(fn, double)
    poll = (await _first_poll(runner, "workflow")).poll
    resp = await runner.run(_resume("workflow", poll, {1: 2}))
    assert resp.status == Status.OK
    assert resp.exit.HasField("result")
    assert not resp.exit.result.HasField("output")
    assert not resp.exit.result.HasField("error")


async def test_the_same_result_twice_in_one_resume() -> None:
    """Delivered at least once: a duplicate in the same PollResult changes nothing."""

    async def both() -> int:
        return sum(await asyncio.gather(double(1), double(2)))

    fn = Function(both, name="workflow")
    for cache_size in (8, 0):
        runner = _runner(fn, double, cache_size=cache_size)
        poll = (await _first_poll(runner, "workflow")).poll
        req = _resume("workflow", poll, {1: 2})
        req.poll_result.results.append(req.poll_result.results[0])
        poll = (await runner.run(req)).poll
        assert poll.min_results == 1 and len(poll.calls) == 0, poll
        resp = await runner.run(_resume("workflow", poll, {2: 4}))
        assert resp.status == Status.OK, resp
        assert _codec.decode_value(resp.exit.result.output) == 6
        await runner.aclose()


async def test_concurrent_resumes_of_one_run_leave_one_live_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[Run] = []
    close = Run.close

    async def recording_close(run: Run) -> None:
        closed.append(run)
        await close(run)

    monkeypatch.setattr(Run, "close", recording_close)

    async def waits() -> int:
        first = await double(1)
        await asyncio.to_thread(time.sleep, 0.1)  # keeps both resumes in flight at once
        return first + await double(2)

    fn = Function(waits, name="workflow")
    runner = _runner(fn, double, cache_size=8)
    poll = (await _first_poll(runner, "workflow")).poll
    # The scheduler retries a resume while the first is still running.
    first = asyncio.ensure_future(runner.run(_resume("workflow", poll, {1: 2})))
    second = asyncio.ensure_future(runner.run(_resume("workflow", poll, {1: 2})))
    await asyncio.gather(first, second)
    assert len(runner._cache) == 1
    [kept] = runner._cache.values()
    assert len(closed) == 1 and closed[0] is not kept  # the other one was let go of
    await runner.aclose()
    assert closed[1] is kept


async def test_idle_runs_are_dropped_without_traffic() -> None:
    fn = Function(_counted, name="workflow")
    runner = Runner(
        lambda name: {"workflow": fn.fn, "double": double.fn}.get(name), cache_idle_timeout=0.1
    )
    poll = (await _first_poll(runner, "workflow")).poll
    assert poll.calls
    [run] = runner._cache.values()
    await asyncio.sleep(0.3)
    assert not runner._cache
    assert run.loop.is_closed()
    await runner.aclose()


async def test_a_run_suspending_after_aclose_is_torn_down() -> None:
    gate = asyncio.Event()

    async def slow() -> int:
        await gate.wait()
        return await double(1)

    fn = Function(slow, name="workflow")
    runner = _runner(fn, double, cache_size=8)
    request = function_pb2.RunRequest(function="workflow", input=_codec.encode_input((), {}))
    in_flight = asyncio.ensure_future(runner.run(request))
    await asyncio.sleep(0.01)
    await runner.aclose()
    gate.set()
    assert (await in_flight).WhichOneof("directive") == "poll"
    assert not runner._cache
