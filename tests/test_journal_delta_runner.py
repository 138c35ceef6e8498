"""The journal extension at the endpoint's side: the runner, and the test environment."""

from __future__ import annotations

from google.protobuf import any_pb2

from dispatch_aio import Dispatch, Status
from dispatch_aio._codec import encode_input
from dispatch_aio.durable import Runner
from dispatch_aio.durable._journal import (
    JOURNAL_DELTA_TYPE_URL,
    JOURNAL_NEEDED,
    JOURNAL_REF_TYPE_URL,
    JOURNAL_TYPE_URL,
)
from dispatch_aio.proto.sdk.v1 import function_pb2, poll_pb2
from dispatch_aio.proto.v1 import journal_pb2
from dispatch_aio.testing import Environment

dispatch = Dispatch()


@dispatch.function
async def step(i: int) -> int:
    return i


@dispatch.function
async def chain(n: int) -> int:
    total = 0
    for i in range(n):
        total += await step(i)
    return total


async def test_the_environment_uses_the_extension_with_the_live_cache() -> None:
    async with Environment(dispatch) as env:
        assert await env.call(chain, 5) == 10
        polls = [r.poll for r in env.responses if r.HasField("poll")]
        resumes = [r for r in env.requests if r.HasField("poll_result")]
    assert {p.typed_coroutine_state.type_url for p in polls} == {JOURNAL_DELTA_TYPE_URL}
    assert {r.poll_result.typed_coroutine_state.type_url for r in resumes} == {JOURNAL_REF_TYPE_URL}
    deltas = [journal_pb2.JournalDelta.FromString(p.typed_coroutine_state.value) for p in polls]
    assert [(d.polls_before, d.polls) for d in deltas] == [(i, i + 1) for i in range(5)]
    # The segments joined are the journal.
    journal = journal_pb2.Journal.FromString(b"".join(d.segment for d in deltas))
    assert journal.function == "chain" and journal.polls == 5 and len(journal.calls) == 5


async def test_the_plain_protocol_when_asked_or_without_the_cache() -> None:
    for options in ({"journal": "whole"}, {"replay": "always"}):
        async with Environment(dispatch, **options) as env:  # type: ignore[arg-type]
            assert await env.call(chain, 3) == 3
            urls = {
                r.poll.typed_coroutine_state.type_url for r in env.responses if r.HasField("poll")
            }
        assert urls == {JOURNAL_TYPE_URL}, options


async def test_a_run_lost_from_the_cache_resumes_from_the_whole_journal() -> None:
    async with Environment(dispatch) as env:
        original = env._runner.run
        rounds = 0

        async def forgetful(
            request: function_pb2.RunRequest, *, journal_delta: bool = False
        ) -> function_pb2.RunResponse:
            nonlocal rounds
            rounds += 1
            if rounds % 3 == 0:
                # As after a restart of the app: no live run.
                while env._runner._cache:
                    _, run = env._runner._cache.popitem()
                    await env._runner._let_go(run)
            return await original(request, journal_delta=journal_delta)

        env._runner.run = forgetful  # type: ignore[method-assign]
        assert await env.call(chain, 8) == 28
        needed = [r for r in env.responses if r.exit.result.error.type == JOURNAL_NEEDED]
        whole = [
            r
            for r in env.requests
            if r.poll_result.typed_coroutine_state.type_url == JOURNAL_TYPE_URL
        ]
    assert needed and len(whole) == len(needed)


def _resume(state_url: str, value: bytes) -> function_pb2.RunRequest:
    result = poll_pb2.PollResult()
    result.typed_coroutine_state.type_url = state_url
    result.typed_coroutine_state.value = value
    return function_pb2.RunRequest(function="chain", poll_result=result)


async def test_a_reference_continues_only_the_round_it_names() -> None:
    runner = Runner({"chain": chain.fn, "step": step.fn}.get)
    try:
        first = await runner.run(
            function_pb2.RunRequest(function="chain", input=_int(3)), journal_delta=True
        )
        delta = journal_pb2.JournalDelta.FromString(first.poll.typed_coroutine_state.value)
        assert (delta.polls_before, delta.polls) == (0, 1)
        stale = journal_pb2.JournalRef(run_id=delta.run_id, polls=1, tag=b"another")
        answer = await runner.run(
            _resume(JOURNAL_REF_TYPE_URL, stale.SerializeToString()), journal_delta=True
        )
        assert Status(answer.status) is Status.INCOMPATIBLE_STATE
        assert answer.exit.result.error.type == JOURNAL_NEEDED
        # The mismatch let go of the live run: the right tag is a miss too now.
        ref = journal_pb2.JournalRef(run_id=delta.run_id, polls=1, tag=delta.tag)
        answer = await runner.run(
            _resume(JOURNAL_REF_TYPE_URL, ref.SerializeToString()), journal_delta=True
        )
        assert answer.exit.result.error.type == JOURNAL_NEEDED
        # A delta sent back as the state (a scheduler that does not keep it) restarts.
        answer = await runner.run(_resume(JOURNAL_DELTA_TYPE_URL, delta.SerializeToString()))
        assert Status(answer.status) is Status.INCOMPATIBLE_STATE
        assert "JournalDelta" in answer.exit.result.error.message
        assert answer.exit.result.error.type != JOURNAL_NEEDED
    finally:
        await runner.aclose()


def _int(value: int) -> any_pb2.Any:
    return encode_input((value,), {}, function="chain")
