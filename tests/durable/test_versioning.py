"""Changing code under runs in flight: patched(), deprecate_patch(), divergence policies."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dispatch_aio import _codec, deprecate_patch, patched
from dispatch_aio._function import Function
from dispatch_aio._status import Status
from dispatch_aio.durable import Runner
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, poll_pb2
from dispatch_aio.proto.v1 import journal_pb2
from dispatch_aio.testing import check_journals


async def _old_step(x: int) -> str:
    return f"old {x}"


async def _new_step(x: int) -> str:
    return f"new {x}"


async def _after(x: int) -> int:
    return x


old_step = Function(_old_step, name="old_step")
new_step = Function(_new_step, name="new_step")
after = Function(_after, name="after")


async def _v1(x: int) -> str:
    first = await old_step(x)
    await after(x)
    return first


async def _v2(x: int) -> str:
    if patched("new-step"):
        first = await new_step(x)
    else:
        first = await old_step(x)
    await after(x)
    return first


async def _v3(x: int) -> str:
    deprecate_patch("new-step")
    first = await new_step(x)
    await after(x)
    return first


async def _patched_late(x: int) -> str:
    await old_step(x)
    await after(x)  # runs recorded before the change never got here
    return "late new" if patched("late") else "late old"


def _runner(body: Callable[..., Awaitable[Any]], **options: Any) -> Runner:
    table = {
        "workflow": body,
        "old_step": _old_step,
        "new_step": _new_step,
        "after": _after,
    }
    return Runner(table.get, cache_size=0, **options)


def _start(x: int = 1) -> function_pb2.RunRequest:
    return function_pb2.RunRequest(
        function="workflow", input=_codec.encode_input((x,), {}), dispatch_id="d-1"
    )


def _resume(poll: poll_pb2.Poll, results: dict[int, Any]) -> function_pb2.RunRequest:
    out = poll_pb2.PollResult(typed_coroutine_state=poll.typed_coroutine_state)
    for cid, value in results.items():
        out.results.append(
            call_pb2.CallResult(correlation_id=cid, output=_codec.encode_value(value))
        )
    return function_pb2.RunRequest(function="workflow", poll_result=out, dispatch_id="d-1")


async def _first_poll(runner: Runner) -> poll_pb2.Poll:
    response = await runner.run(_start())
    assert response.WhichOneof("directive") == "poll", response
    return response.poll


def _journal(poll: poll_pb2.Poll) -> journal_pb2.Journal:
    return journal_pb2.Journal.FromString(poll.typed_coroutine_state.value)


async def _finish(runner: Runner, poll: poll_pb2.Poll, first: Any) -> function_pb2.RunResponse:
    """Deliver ``first`` to call 1, then the result of `after` to call 2."""
    response = await runner.run(_resume(poll, {1: first}))
    assert response.WhichOneof("directive") == "poll", response
    assert [c.function for c in response.poll.calls] == ["after"]
    return await runner.run(_resume(response.poll, {2: 1}))


def _output(response: function_pb2.RunResponse) -> Any:
    assert response.status == Status.OK, response
    return _codec.decode_value(response.exit.result.output)


async def test_a_run_recorded_before_the_patch_takes_the_old_branch() -> None:
    poll = await _first_poll(_runner(_v1))
    assert [c.function for c in poll.calls] == ["old_step"]
    assert not _journal(poll).patches
    # The code changed while the run waited: the new code replays it on the old branch.
    response = await _finish(_runner(_v2), poll, "old 1")
    assert _output(response) == "old 1"


async def test_a_new_run_takes_the_new_branch_and_records_the_patch() -> None:
    runner = _runner(_v2)
    poll = await _first_poll(runner)
    assert [c.function for c in poll.calls] == ["new_step"]
    assert list(_journal(poll).patches) == ["new-step"]
    # Replayed (cache off), it stays on the new branch.
    assert _output(await _finish(runner, poll, "new 1")) == "new 1"


async def test_a_run_that_had_not_reached_the_patch_takes_the_new_branch() -> None:
    poll = await _first_poll(_runner(_v1))
    response = await _runner(_patched_late).run(_resume(poll, {1: "old 1"}))
    assert [c.function for c in response.poll.calls] == ["after"]
    final = await _runner(_patched_late).run(_resume(response.poll, {2: 1}))
    assert _output(final) == "late new"


async def test_deprecate_patch_replays_new_journals_and_names_old_ones() -> None:
    new_poll = await _first_poll(_runner(_v2))
    assert _output(await _finish(_runner(_v3), new_poll, "new 1")) == "new 1"

    old_poll = await _first_poll(_runner(_v1))
    response = await _runner(_v3).run(_resume(old_poll, {1: "old 1"}))
    assert response.status == Status.INCOMPATIBLE_STATE
    message = response.exit.result.error.message
    assert "patch 'new-step'" in message and "deprecate_patch('new-step')" in message


async def test_check_journals_lists_the_journals_that_need_an_old_branch() -> None:
    old = (await _first_poll(_runner(_v1))).typed_coroutine_state.value
    new = (await _first_poll(_runner(_v2))).typed_coroutine_state.value
    functions = [
        Function(_v2, name="workflow"),
        old_step,
        new_step,
        after,
    ]
    old_report, new_report = await check_journals(functions, [("old", old), ("new", new)])
    assert old_report.ok and old_report.old_patches == ("new-step",)
    assert new_report.ok and new_report.old_patches == ()


async def test_the_app_version_is_recorded_and_named_in_divergences() -> None:
    poll = await _first_poll(_runner(_v1, version="v1"))
    assert _journal(poll).app_version == "v1"
    response = await _runner(_v3, version="v3").run(_resume(poll, {1: "old 1"}))
    message = response.exit.result.error.message
    assert "version v1 of the application; this is version v3" in message


async def test_divergence_policy_fail(caplog: pytest.LogCaptureFixture) -> None:
    poll = await _first_poll(_runner(_v1))
    with caplog.at_level(logging.WARNING, "dispatch_aio"):
        response = await _runner(
            _v3, divergence_policy=lambda name: "fail" if name == "workflow" else None
        ).run(_resume(poll, {1: "old 1"}))
    assert response.status == Status.PERMANENT_ERROR
    assert response.exit.result.error.type == "NondeterminismError"
    [record] = [r for r in caplog.records if "diverged" in r.getMessage()]
    line = record.getMessage()
    # The report: function, dispatch id, the policy, both sides and the call site.
    assert "call d-1 of 'workflow'" in line and "on_divergence='fail'" in line
    assert "test_versioning.py:" in line


async def test_divergence_policy_restart_is_the_default() -> None:
    poll = await _first_poll(_runner(_v1))
    response = await _runner(_v3).run(_resume(poll, {1: "old 1"}))
    assert response.status == Status.INCOMPATIBLE_STATE
    response = await _runner(_v3, on_divergence="fail").run(_resume(poll, {1: "old 1"}))
    assert response.status == Status.PERMANENT_ERROR


def test_policies_are_checked() -> None:
    with pytest.raises(ValueError, match="on_divergence"):
        Runner(lambda name: None, on_divergence="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nondeterminism"):
        Runner(lambda name: None, nondeterminism="loud")  # type: ignore[arg-type]


async def test_patched_outside_a_durable_function_is_the_new_branch() -> None:
    assert patched("anything")
    deprecate_patch("anything")
    assert await _v2(3) == "new 3"


async def test_a_function_carries_its_divergence_policy() -> None:
    strict = Function(_v3, name="workflow", on_divergence="fail")
    assert strict.on_divergence == "fail" and after.on_divergence is None
    with pytest.raises(ValueError, match="on_divergence"):
        Function(_v3, name="workflow", on_divergence="later")  # type: ignore[arg-type]
    functions = {f.name: f for f in (strict, old_step, new_step, after)}
    poll = await _first_poll(_runner(_v1))
    runner = Runner(
        lambda name: f.fn if (f := functions.get(name)) else None,
        divergence_policy=lambda name: f.on_divergence if (f := functions.get(name)) else None,
    )
    response = await runner.run(_resume(poll, {1: "old 1"}))
    assert response.status == Status.PERMANENT_ERROR
