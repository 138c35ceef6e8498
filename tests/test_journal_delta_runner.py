"""The journal extension at the endpoint's side: the runner, and the test environment."""

from __future__ import annotations

import gc

from google.protobuf import any_pb2

from dispatch_aio import Dispatch, Status
from dispatch_aio._codec import encode_input, encode_value
from dispatch_aio.durable import Runner
from dispatch_aio.durable._journal import (
    JOURNAL_DELTA_TYPE_URL,
    JOURNAL_NEEDED,
    JOURNAL_REF_TYPE_URL,
    JOURNAL_TYPE_URL,
)
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, poll_pb2
from dispatch_aio.proto.v1 import journal_pb2
from dispatch_aio.testing import Environment

dispatch = Dispatch()


@dispatch.function
async def step(i: int) -> int:
    return i


class Blob:
    """A result whose copies the tests count."""


@dispatch.function
async def make_blob() -> Blob:
    return Blob()


@dispatch.function
async def drop_blobs(n: int) -> int:
    for _ in range(n):
        assert isinstance(await make_blob(), Blob)
    return n


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


def _resume(state_url: str, value: bytes, function: str = "chain") -> function_pb2.RunRequest:
    result = poll_pb2.PollResult()
    result.typed_coroutine_state.type_url = state_url
    result.typed_coroutine_state.value = value
    return function_pb2.RunRequest(function=function, poll_result=result)


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


def _resumed(
    function: str, delta: journal_pb2.JournalDelta, *results: call_pb2.CallResult
) -> function_pb2.RunRequest:
    ref = journal_pb2.JournalRef(run_id=delta.run_id, polls=delta.polls, tag=delta.tag)
    request = _resume(JOURNAL_REF_TYPE_URL, ref.SerializeToString(), function)
    request.poll_result.results.extend(results)
    return request


async def test_a_live_run_keeps_no_result_it_has_consumed() -> None:
    # Its journal is kept by the scheduler, and each result is the function's once
    # delivered: a long run holds what its code holds, and one record of the call it
    # waits for, whatever the length of its history.
    runner = Runner({"drop_blobs": drop_blobs.fn, "make_blob": make_blob.fn}.get)
    try:
        request = function_pb2.RunRequest(
            function="drop_blobs", input=encode_input((5,), {}, function="drop_blobs")
        )
        answer = await runner.run(request, journal_delta=True)
        segments: list[bytes] = []
        for correlation_id in range(1, 5):
            delta = journal_pb2.JournalDelta.FromString(answer.poll.typed_coroutine_state.value)
            result = call_pb2.CallResult(correlation_id=correlation_id, output=encode_value(Blob()))
            answer = await runner.run(_resumed("drop_blobs", delta, result), journal_delta=True)
            assert answer.HasField("poll"), answer
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, Blob)]
            # The call waited for, and the one record of the calls delivered.
            [run] = runner._cache.values()
            assert len(run.calls) == correlation_id + 1
            assert len({id(call) for call in run.calls}) == 2
            segments.append(delta.segment)
    finally:
        await runner.aclose()
    # Another process (a new runner) resumes the run from the whole journal of its
    # first four rounds: replayed, then live again, it keeps no more than the first did.
    other = Runner({"drop_blobs": drop_blobs.fn, "make_blob": make_blob.fn}.get)
    try:
        whole = _resume(JOURNAL_TYPE_URL, b"".join(segments), "drop_blobs")
        whole.poll_result.results.append(
            call_pb2.CallResult(correlation_id=4, output=encode_value(Blob()))
        )
        answer = await other.run(whole, journal_delta=True)
        assert [c.correlation_id for c in answer.poll.calls] == [5], answer
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, Blob)]
        [run] = other._cache.values()
        assert len(run.calls) == 5 and len({id(call) for call in run.calls}) == 2
    finally:
        await other.aclose()


async def test_a_reference_without_the_extension_asks_for_the_whole_journal() -> None:
    # The journal went out in deltas: the run cannot answer with the whole journal, so
    # it asks for it (without running any code), then replays it.
    runner = Runner({"chain": chain.fn, "step": step.fn}.get)
    try:
        first = await runner.run(
            function_pb2.RunRequest(function="chain", input=_int(2)), journal_delta=True
        )
        delta = journal_pb2.JournalDelta.FromString(first.poll.typed_coroutine_state.value)
        result = call_pb2.CallResult(correlation_id=1, output=encode_value(5))
        answer = await runner.run(_resumed("chain", delta, result))
        assert Status(answer.status) is Status.INCOMPATIBLE_STATE
        assert answer.exit.result.error.type == JOURNAL_NEEDED
        whole = _resume(JOURNAL_TYPE_URL, delta.segment)
        whole.poll_result.results.append(result)
        answer = await runner.run(whole)
        assert answer.poll.typed_coroutine_state.type_url == JOURNAL_TYPE_URL
        journal = journal_pb2.Journal.FromString(answer.poll.typed_coroutine_state.value)
        assert journal.polls == 2 and [c.poll for c in journal.calls] == [1, 2]
    finally:
        await runner.aclose()
