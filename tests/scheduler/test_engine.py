"""Poll semantics and the call state machine, driven through a scripted endpoint."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import socket
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from aiohttp import web
from google.protobuf import any_pb2, duration_pb2

from dispatch_aio import Call, Client, Dispatch, errors
from dispatch_aio._status import status_for_http
from dispatch_aio.proto.sdk.v1 import call_pb2, error_pb2, exit_pb2, function_pb2, status_pb2
from dispatch_aio.scheduler import DEFAULT_EXPIRATION, RetryPolicy, Scheduler, SQLiteStore
from dispatch_aio.scheduler._engine import _Ids
from dispatch_aio.scheduler.store import (
    WRITE_ALONE,
    WRITE_URGENT,
    CallQuery,
    CallRecord,
    InsertCall,
    Op,
    Snapshot,
    Store,
    UpdateCall,
)

from .scripted import (
    API_KEY,
    Received,
    ScriptedEndpoint,
    call,
    fail,
    ok,
    poll,
    resumed,
    unpack_text,
)

MakeScheduler = Callable[..., Awaitable[Scheduler]]


async def run(s: Scheduler, function: str, value: str = "", **kw: object) -> call_pb2.CallResult:
    [dispatch_id] = await s.dispatch([call(function, value, **kw)])  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        return await s.wait(dispatch_id)


def outputs(received: Received) -> dict[int, str]:
    return {r.correlation_id: unpack_text(r.output) for r in received.results}


class Gate:
    """Children that answer only when released."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    def event(self, key: str) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    def release(self, *keys: str) -> None:
        for key in keys:
            self.event(key).set()

    def script(self) -> Callable[[function_pb2.RunRequest], Awaitable[function_pb2.RunResponse]]:
        async def answer(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
            value = unpack_text(req.input)
            await self.event(value).wait()
            return ok(value.upper())

        return answer


async def test_run_request_carries_ids_times_and_input(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url, default_expiration=3600)

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "c", correlation_id=7)])
        return ok("done")

    endpoint.on("parent", parent)
    endpoint.on("child", lambda req: ok("x"))
    before = time.time()
    [parent_id] = await s.dispatch([call("parent", "p")])
    assert (await s.wait(parent_id)).dispatch_id == parent_id
    after = time.time()

    first = endpoint.for_id(parent_id)[0]
    assert first.request.WhichOneof("directive") == "input"
    assert unpack_text(first.request.input) == "p"
    assert first.request.root_dispatch_id == parent_id
    assert first.request.parent_dispatch_id == ""
    created = first.request.creation_time.ToNanoseconds() / 1e9
    assert before - 0.01 <= created <= after
    assert first.request.expiration_time.ToNanoseconds() / 1e9 == pytest.approx(created + 3600)
    assert first.headers["Content-Type"] == "application/proto"
    assert {"Content-Digest", "Signature-Input", "Signature"} <= set(first.headers)

    [child] = endpoint.requests_for("child")
    assert child.request.parent_dispatch_id == parent_id
    assert child.request.root_dispatch_id == parent_id
    assert child.request.dispatch_id not in ("", parent_id)
    assert unpack_text(child.request.input) == "c"
    # The child's endpoint defaulted to the poller's (the only server in this test).
    assert child.request.expiration_time.ToNanoseconds() <= (
        first.request.expiration_time.ToNanoseconds()
    )
    resume = endpoint.for_id(parent_id)[1]
    assert resume.request.creation_time == first.request.creation_time
    assert resume.request.expiration_time == first.request.expiration_time
    [result] = resume.results
    assert (result.correlation_id, result.dispatch_id) == (7, child.request.dispatch_id)


async def test_default_expiration_is_documented_value(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("f", lambda req: ok("x"))
    await run(s, "f")
    [req] = endpoint.received
    span = req.request.expiration_time.ToNanoseconds() - req.request.creation_time.ToNanoseconds()
    assert span / 1e9 == pytest.approx(DEFAULT_EXPIRATION)
    assert DEFAULT_EXPIRATION == 7 * 24 * 3600


async def test_min_results_waits_for_enough_results(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    gate = Gate()
    endpoint.on("child", gate.script())

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            calls = [call("child", v, correlation_id=i) for i, v in enumerate("abc", 1)]
            return poll(calls, min_results=3, max_results=10)
        return ok(",".join(sorted(outputs(endpoint.received[-1]).values())))

    endpoint.on("parent", parent)
    [pid] = await s.dispatch([call("parent")])
    await endpoint.wait_for(lambda: len(endpoint.requests_for("child")) == 3)
    gate.release("a", "b")
    await asyncio.sleep(0.2)
    assert len(endpoint.for_id(pid)) == 1, "resumed before min_results were available"
    gate.release("c")
    async with asyncio.timeout(5):
        result = await s.wait(pid)
    assert unpack_text(result.output) == "A,B,C"
    assert len(endpoint.for_id(pid)) == 2


async def test_max_results_splits_delivery_and_keeps_the_rest_queued(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: ok(unpack_text(req.input)))
    seen: list[list[int]] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            calls = [call("child", str(i), correlation_id=i) for i in range(5)]
            return poll(calls, min_results=5, max_results=2)
        seen.append([r.correlation_id for r in req.poll_result.results])
        if sum(map(len, seen)) == 5:
            return ok("all")
        return poll(min_results=1, max_results=2)

    endpoint.on("parent", parent)
    assert unpack_text((await run(s, "parent")).output) == "all"
    assert [len(batch) for batch in seen] == [2, 2, 1]
    assert sorted(c for batch in seen for c in batch) == [0, 1, 2, 3, 4]


async def test_max_wait_resumes_with_the_results_available(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    gate = Gate()
    endpoint.on("child", gate.script())
    resumes: list[tuple[float, int]] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            calls = [call("child", "fast", correlation_id=1), call("child", "slow", 2)]
            return poll(calls, min_results=2, max_wait=0.3)
        resumes.append((time.monotonic(), len(req.poll_result.results)))
        return ok("done")

    endpoint.on("parent", parent)
    gate.release("fast")
    start = time.monotonic()
    await run(s, "parent")
    [(at, count)] = resumes
    assert count == 1
    assert at - start >= 0.3
    gate.release("slow")


async def test_max_wait_with_no_results_resumes_empty(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)

    def sleeper(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll(max_wait=0.2, state=b"timer")
        assert not req.poll_result.results
        return ok(req.poll_result.coroutine_state.decode())

    endpoint.on("sleeper", sleeper)
    start = time.monotonic()
    assert unpack_text((await run(s, "sleeper")).output) == "timer"
    assert time.monotonic() - start >= 0.2


async def test_results_of_earlier_polls_are_delivered_later(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    gate = Gate()
    endpoint.on("child", gate.script())
    deliveries: list[dict[int, str]] = []

    async def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "a", 1), call("child", "b", 2)], min_results=1)
        deliveries.append(outputs(endpoint.for_id(req.dispatch_id)[-1]))
        if len(deliveries) == 1:
            # B, made by the first poll, is still running: it arrives with C's result.
            gate.release("b", "c")
            return poll([call("child", "c", 3)], min_results=2)
        return ok("done")

    endpoint.on("parent", parent)
    gate.release("a")
    await run(s, "parent")
    assert deliveries == [{1: "A"}, {2: "B", 3: "C"}]


async def test_results_arriving_during_a_run_are_queued(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: ok(unpack_text(req.input)))
    deliveries: list[dict[int, str]] = []

    async def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "a", 1), call("child", "b", 2)], min_results=1)
        deliveries.append(outputs(endpoint.for_id(req.dispatch_id)[-1]))
        if sum(map(len, deliveries)) == 2:
            return ok("done")
        await asyncio.sleep(0.1)  # the other child finishes while this resume runs
        return poll(min_results=1)

    endpoint.on("parent", parent)
    await run(s, "parent")
    assert sorted(c for d in deliveries for c in d) == [1, 2]


async def test_poll_error_dispatches_none_of_the_calls(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: ok("x"))
    errors: list[tuple[str, str]] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "ok", 1), call("bad-name", "", 2)], state=b"s1")
        pr = req.poll_result
        errors.append((pr.error.type, pr.error.message))
        assert pr.coroutine_state == b"s1"
        assert not pr.results
        return ok("handled")

    endpoint.on("parent", parent)
    assert unpack_text((await run(s, "parent")).output) == "handled"
    [(type_, message)] = errors
    assert type_ == "STATUS_INVALID_ARGUMENT"
    assert "calls[1].function 'bad-name'" in message
    assert "not dispatched" in message
    assert endpoint.requests_for("child") == []


@pytest.mark.parametrize(
    "bad_call",
    [
        call_pb2.Call(function="f", endpoint="ftp://host/x"),
        call_pb2.Call(function="f", expiration=duration_pb2.Duration(seconds=-1)),
        call_pb2.Call(function=""),
    ],
    ids=["endpoint-scheme", "negative-expiration", "no-function"],
)
async def test_poll_error_for_each_validation_rule(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, bad_call: call_pb2.Call
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on(
        "parent",
        lambda req: ok(req.poll_result.error.message) if resumed(req) else poll([bad_call]),
    )
    message = unpack_text((await run(s, "parent")).output)
    assert message.startswith("the Poll's calls were not dispatched: calls[0].")


@pytest.mark.parametrize(
    "status",
    [status_pb2.STATUS_OK, status_pb2.STATUS_TEMPORARY_ERROR, status_pb2.STATUS_PERMANENT_ERROR],
)
async def test_tail_call_is_honoured_whatever_the_status(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, status: int
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    tail = function_pb2.RunResponse(
        status=status,  # type: ignore[arg-type]
        exit=exit_pb2.Exit(tail_call=call("second", "handed over")),
    )
    endpoint.on("first", lambda req: tail)
    endpoint.on("second", lambda req: ok(unpack_text(req.input) + "!"))
    result = await run(s, "first", "x")
    assert unpack_text(result.output) == "handed over!"
    [first] = endpoint.requests_for("first")
    [second] = endpoint.requests_for("second")
    assert second.request.dispatch_id == first.request.dispatch_id == result.dispatch_id
    assert second.request.WhichOneof("directive") == "input"
    assert second.request.creation_time == first.request.creation_time
    assert second.request.expiration_time == first.request.expiration_time
    assert second.request.root_dispatch_id == first.request.root_dispatch_id


async def test_tail_call_of_a_child_reports_to_the_parent(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on(
        "child",
        lambda req: function_pb2.RunResponse(
            status=status_pb2.STATUS_OK, exit=exit_pb2.Exit(tail_call=call("grandchild", "g"))
        ),
    )
    endpoint.on("grandchild", lambda req: ok("from tail"))
    endpoint.on(
        "parent",
        lambda req: (
            ok(outputs(endpoint.for_id(req.dispatch_id)[-1])[9])
            if resumed(req)
            else poll([call("child", "c", 9)])
        ),
    )
    assert unpack_text((await run(s, "parent")).output) == "from tail"


async def test_incompatible_state_restarts_from_the_original_input(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: ok("c"))
    resumes = 0

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        nonlocal resumes
        if not resumed(req):
            return poll([call("child", "x", 1)], state=b"v1")
        resumes += 1
        if resumes == 1:
            return fail(status_pb2.STATUS_INCOMPATIBLE_STATE, "state from an older version")
        return ok(f"resumed {resumes}")

    endpoint.on("parent", parent)
    result = await run(s, "parent", "original")
    assert unpack_text(result.output) == "resumed 2"
    kinds = [r.request.WhichOneof("directive") for r in endpoint.requests_for("parent")]
    assert kinds == ["input", "poll_result", "input", "poll_result"]
    restarted = endpoint.requests_for("parent")[2].request
    assert unpack_text(restarted.input) == "original"
    assert len(endpoint.requests_for("child")) == 2


async def test_expiration_fails_a_waiting_call(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("waiter", lambda req: poll(min_results=1))  # waits for nothing, forever
    start = time.monotonic()
    result = await run(s, "waiter", expiration=duration_pb2.Duration(nanos=300_000_000))
    assert time.monotonic() - start >= 0.3
    assert result.error.type == "STATUS_TIMEOUT"
    assert "expired" in result.error.message


async def test_expired_child_reports_to_its_parent(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    gate = Gate()
    endpoint.on("child", gate.script())
    short = duration_pb2.Duration(nanos=200_000_000)
    endpoint.on(
        "parent",
        lambda req: (
            ok(endpoint.for_id(req.dispatch_id)[-1].results[0].error.type)
            if resumed(req)
            else poll([call("child", "never", 5, expiration=short)])
        ),
    )
    assert unpack_text((await run(s, "parent")).output) == "STATUS_TIMEOUT"
    gate.release("never")


async def test_retries_follow_exponential_backoff_with_full_jitter(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    policy = RetryPolicy(initial_backoff=0.04, max_backoff=0.2, multiplier=2.0)
    s = await make_scheduler(default_endpoint=endpoint.url, retry=policy, rng=random.Random(42))
    failures = 4

    def flaky(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if len(endpoint.received) <= failures:
            return fail(status_pb2.STATUS_TEMPORARY_ERROR, "try again")
        return ok("finally")

    endpoint.on("flaky", flaky)
    assert unpack_text((await run(s, "flaky")).output) == "finally"
    times = [r.at for r in endpoint.received]
    assert len(times) == failures + 1
    expected_rng = random.Random(42)
    expected = [policy.backoff(n, expected_rng) for n in range(1, failures + 1)]
    for n, (gap, delay) in enumerate(
        zip([b - a for a, b in itertools.pairwise(times)], expected, strict=True), 1
    ):
        assert delay <= min(0.2, 0.04 * 2 ** (n - 1))
        assert gap >= delay - 0.002, (n, gap, delay)
        assert gap < delay + 0.15, (n, gap, delay)


@pytest.mark.parametrize(
    ("http_status", "retried"),
    [
        (500, True),
        (502, True),
        (503, True),
        (408, True),
        (429, True),
        (501, False),
        (400, False),
        (401, False),
        (404, False),
        (409, False),
    ],
)
async def test_http_failures_are_retried_by_code(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, http_status: int, retried: bool
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)

    def f(req: function_pb2.RunRequest) -> function_pb2.RunResponse | web.Response:
        if len(endpoint.received) == 1:
            return web.json_response({"code": "x", "message": "nope"}, status=http_status)
        return ok("second attempt")

    endpoint.on("f", f)
    result = await run(s, "f")
    if retried:
        assert unpack_text(result.output) == "second attempt"
        assert len(endpoint.received) == 2
    else:
        assert len(endpoint.received) == 1
        assert result.error.type == status_for_http(http_status).proto_name
        assert f"HTTP {http_status}" in result.error.message
        assert "nope" in result.error.message


async def test_non_proto_200_is_an_invalid_response(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("f", lambda req: web.Response(text="hello"))
    result = await run(s, "f")
    assert result.error.type == "STATUS_INVALID_RESPONSE"
    assert "text/plain" in result.error.message
    assert len(endpoint.received) == 1


async def test_network_errors_are_retried_until_expiration(
    make_scheduler: MakeScheduler, unused_tcp_port: int
) -> None:
    s = await make_scheduler(default_endpoint=f"http://127.0.0.1:{unused_tcp_port}")
    # Long enough for a few attempts (their errors name the cause) even on a loaded machine.
    result = await run(s, "f", expiration=duration_pb2.Duration(seconds=1))
    assert result.error.type == "STATUS_TIMEOUT"
    assert "connection" in result.error.message.lower()


@pytest.mark.parametrize(
    "status",
    [
        status_pb2.STATUS_PERMANENT_ERROR,
        status_pb2.STATUS_INVALID_ARGUMENT,
        status_pb2.STATUS_NOT_FOUND,
        status_pb2.STATUS_UNSPECIFIED,
    ],
)
async def test_permanent_statuses_are_not_retried(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, status: int
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("f", lambda req: fail(status, "broken", type_="ValueError"))
    result = await run(s, "f")
    assert len(endpoint.received) == 1
    assert (result.error.type, result.error.message) == ("ValueError", "broken")


async def test_non_ok_child_without_error_gets_a_synthesized_one(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: fail(status_pb2.STATUS_PERMISSION_DENIED))
    delivered: list[call_pb2.CallResult] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "x", correlation_id=2**64 - 1)])
        delivered.extend(req.poll_result.results)
        return ok("seen")

    endpoint.on("parent", parent)
    await run(s, "parent")
    [result] = delivered
    assert result.correlation_id == 2**64 - 1
    assert result.dispatch_id == endpoint.requests_for("child")[0].request.dispatch_id
    assert result.error.type == "STATUS_PERMISSION_DENIED"
    assert "child" in result.error.message
    assert not result.HasField("output")


async def test_failed_resume_delivers_the_same_results_again(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: ok(unpack_text(req.input)))
    resumes: list[dict[int, str]] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "a", 1), call("child", "b", 2)], min_results=2)
        resumes.append(outputs(endpoint.for_id(req.dispatch_id)[-1]))
        if len(resumes) == 1:
            return fail(status_pb2.STATUS_TEMPORARY_ERROR, "lost it")
        return ok("done")

    endpoint.on("parent", parent)
    await run(s, "parent")
    assert resumes == [{1: "a", 2: "b"}, {1: "a", 2: "b"}]


async def test_results_for_a_finished_parent_are_dropped(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    gate = Gate()
    endpoint.on("child", gate.script())
    endpoint.on(
        "parent",
        lambda req: ok("gave up") if resumed(req) else poll([call("child", "a", 1)], max_wait=0.1),
    )
    result = await run(s, "parent")
    assert unpack_text(result.output) == "gave up"
    gate.release("a")
    child_id = endpoint.requests_for("child")[0].request.dispatch_id
    async with asyncio.timeout(5):
        child = await s.wait(child_id)
    assert unpack_text(child.output) == "A"
    await asyncio.sleep(0.05)
    assert s.unfinished == 0
    assert len(endpoint.requests_for("parent")) == 2


@pytest.mark.parametrize(
    "state",
    [
        b"\x00raw state bytes\xff",
        b"",
        any_pb2.Any(type_url="example.com/unknown.Type", value=b"\x01\x02"),
        any_pb2.Any(),
    ],
    ids=["bytes", "empty-bytes", "typed", "empty-typed"],
)
async def test_state_is_echoed_exactly(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, state: bytes | any_pb2.Any
) -> None:
    s = await make_scheduler(default_endpoint=endpoint.url)
    endpoint.on("child", lambda req: ok("c"))
    sent = poll([call("child", "x", 1)], state=state)
    echoed: list[function_pb2.RunRequest] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return sent
        echoed.append(req)
        return ok("done")

    endpoint.on("parent", parent)
    await run(s, "parent")
    [req] = echoed
    member = sent.poll.WhichOneof("state")
    assert member is not None
    assert req.poll_result.WhichOneof("state") == member
    assert getattr(req.poll_result, member) == getattr(sent.poll, member)


async def test_max_attempts_gives_up(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, max_attempts=3)
    s = await make_scheduler(default_endpoint=endpoint.url, retry=policy)
    endpoint.on("f", lambda req: fail(status_pb2.STATUS_TIMEOUT, "slow", "TimeoutError"))
    result = await run(s, "f")
    assert len(endpoint.received) == 3
    assert (result.error.type, result.error.message) == ("TimeoutError", "slow")


async def test_temporary_answers_are_bounded_by_default_and_the_last_error_is_final(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    assert RetryPolicy().max_attempts == 10
    s = await make_scheduler(default_endpoint=endpoint.url)  # FAST_RETRY: the default bound
    error = error_pb2.Error(type="TimeoutError", message="slow", value=b"pickled", traceback=b"tb")

    def slow(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        result = call_pb2.CallResult(error=error)
        return function_pb2.RunResponse(
            status=status_pb2.STATUS_TIMEOUT, exit=exit_pb2.Exit(result=result)
        )

    endpoint.on("slow", slow)
    [dispatch_id] = await s.dispatch([call("slow")])
    async with asyncio.timeout(10):
        rec = await s._require().wait(dispatch_id)
    assert rec is not None
    assert len(endpoint.received) == 10
    # The function's own error, untouched: its caller rebuilds the exception from it.
    assert call_pb2.CallResult.FromString(rec.result).error == error
    assert rec.status == status_pb2.STATUS_TIMEOUT
    assert "gave up after 10 failed attempts" in rec.last_error


async def test_unreachable_function_is_not_counted_towards_max_attempts(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.005, max_attempts=3)
    s = await make_scheduler(default_endpoint=endpoint.url, retry=policy)
    # 6 attempts that get no answer from the function, 2 it answers with a temporary
    # status, then success: only the 2 count, so the call is not given up.
    script = [503, 502, "temporary", 503, 500, "temporary", 503, 504]

    def f(req: function_pb2.RunRequest) -> function_pb2.RunResponse | web.Response:
        step = script[len(endpoint.received) - 1] if len(endpoint.received) <= len(script) else ""
        if step == "temporary":
            return fail(status_pb2.STATUS_TEMPORARY_ERROR, "not yet")
        if step:
            return web.Response(status=step)
        return ok("made it")

    endpoint.on("f", f)
    assert unpack_text((await run(s, "f")).output) == "made it"
    assert len(endpoint.received) == len(script) + 1


async def test_answered_failures_are_counted_again_after_a_success(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.005, max_attempts=3)
    s = await make_scheduler(default_endpoint=endpoint.url, retry=policy)
    endpoint.on("child", lambda req: ok("c"))
    answers: list[str] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        # Two failures, a poll (success), two failures, a poll, then the result:
        # never 3 failures in a row.
        answers.append("poll" if len(answers) % 3 == 2 else "fail")
        if len(answers) == 7:
            return ok("done")
        if answers[-1] == "poll":
            return poll([call("child", "x", len(answers))])
        return fail(status_pb2.STATUS_THROTTLED, "busy")

    endpoint.on("parent", parent)
    assert unpack_text((await run(s, "parent")).output) == "done"
    assert len(answers) == 7


async def test_a_resume_that_reached_no_function_waits_its_backoff(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    policy = RetryPolicy(initial_backoff=0.3, max_backoff=0.3)
    s = await make_scheduler(default_endpoint=endpoint.url, retry=policy, rng=random.Random(5))
    endpoint.on("child", lambda req: ok("c"))
    resumes: list[float] = []

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse | web.Response:
        if not resumed(req):
            return poll([call("child", "x", 1)])
        resumes.append(time.monotonic())
        if len(resumes) == 1:
            return web.Response(status=503)
        return ok("done")

    endpoint.on("parent", parent)
    assert unpack_text((await run(s, "parent")).output) == "done"
    # The result queued again must not resume the call before the backoff is over.
    delay = policy.backoff(1, random.Random(5))
    assert resumes[1] - resumes[0] >= delay - 0.002


async def test_max_expiration_caps_requested_expirations(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    # Long enough for the first Run to go out on a loaded machine, short for a test.
    s = await make_scheduler(default_endpoint=endpoint.url, max_expiration=1.0)
    endpoint.on("waiter", lambda req: poll(min_results=1))
    result = await run(s, "waiter", expiration=duration_pb2.Duration(seconds=3600))
    assert result.error.type == "STATUS_TIMEOUT"
    [req] = endpoint.received
    span = req.request.expiration_time.ToNanoseconds() - req.request.creation_time.ToNanoseconds()
    assert span == pytest.approx(1.0e9)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"initial_backoff": 2.0, "max_backoff": 1.0}, "initial_backoff <= max_backoff"),
        ({"multiplier": 0.5}, "multiplier must be at least 1"),
        ({"max_attempts": -1}, "max_attempts must be >= 0"),
    ],
)
def test_retry_policy_rejects_nonsense(kwargs: dict[str, float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_is_capped_and_never_overflows() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=5.0)
    rng = random.Random(0)
    delays = [policy.backoff(n, rng) for n in (1, 2, 3, 10, 10_000)]
    assert all(0 <= d <= 5.0 for d in delays)
    assert delays[0] <= 1.0


class HintRecordingStore(Store):
    """A real SQLite store that notes, for each write, its calls and the WRITE_ALONE and
    WRITE_URGENT hints."""

    def __init__(self) -> None:
        self.inner = SQLiteStore(":memory:")
        self.writes: list[tuple[str, bool, bool]] = []
        self.written = asyncio.Event()

    async def wait_writes(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.writes) < count:
                self.written.clear()
                await self.written.wait()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def write(self, ops: Sequence[Op]) -> None:
        changed = [
            f"{op.record.function}:{op.record.phase.name}"
            for op in ops
            if isinstance(op, InsertCall | UpdateCall)
        ]
        self.writes.append((" ".join(changed), WRITE_ALONE.get(), WRITE_URGENT.get()))
        await self.inner.write(ops)
        self.written.set()

    async def load(self) -> Snapshot:
        return await self.inner.load()

    async def get_call(self, dispatch_id: str) -> CallRecord | None:
        return await self.inner.get_call(dispatch_id)

    async def list_calls(self, query: CallQuery) -> list[tuple[int, CallRecord]]:
        return await self.inner.list_calls(query)

    async def count_children(self, dispatch_ids: Sequence[str]) -> dict[str, int]:
        return await self.inner.count_children(dispatch_ids)

    async def get_meta(self, key: str) -> bytes | None:
        return await self.inner.get_meta(key)


async def test_the_write_hints_alone_and_urgent(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    """Alone: no other attempt in flight. Urgent: a submission a client awaits from afar."""
    store = HintRecordingStore()
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    await s.serve()
    gate = Gate()
    endpoint.on("child", gate.script())

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll(
                [call("child", "a", correlation_id=1), call("child", "b", 2)], min_results=2
            )
        return ok("done")

    endpoint.on("parent", parent)
    assert s.url is not None
    client = Client(api_key=API_KEY, api_url=s.url, endpoint_url=endpoint.url, env={})
    async with client:
        [pid] = await client.dispatch([Call("parent")])
    await endpoint.wait_for(lambda: len(endpoint.requests_for("child")) == 2)
    gate.release("a")
    await store.wait_writes(3)  # a's result is recorded while b still runs
    gate.release("b")
    async with asyncio.timeout(5):
        await s.wait(pid)
    endpoint.on("alone", lambda req: ok("done"))
    [other] = await s.dispatch([call("alone")])
    async with asyncio.timeout(5):
        await s.wait(other)
    assert store.writes == [
        ("parent:PENDING", False, True),  # through the API: not an attempt, its client waits
        ("child:PENDING child:PENDING parent:SUSPENDED", True, False),  # the parent's poll
        ("child:DONE", False, False),  # a finished while b ran
        # b's result resumed the parent at once: b's finish is written with the parent's
        ("parent:DONE child:DONE", True, False),
        # In process: the submitter shares the loop with the runs a commit there holds up.
        ("alone:PENDING", False, False),
        ("alone:DONE", True, False),
    ]


# A callee's exception reaches its caller, through a real endpoint and the SDK's codec.


@pytest.fixture
async def app(make_scheduler: MakeScheduler) -> AsyncIterator[Dispatch]:
    s = await make_scheduler(
        retry=RetryPolicy(initial_backoff=0.001, max_backoff=0.01, max_attempts=4)
    )
    api_url = await s.serve("127.0.0.1", 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dispatch = Dispatch(
        api_key=API_KEY,
        api_url=api_url,
        endpoint_url=f"http://127.0.0.1:{port}",
        endpoint_addr=f"127.0.0.1:{port}",
        verification_key=s.verification_key,
    )
    async with dispatch:
        server = await dispatch.start()
        yield dispatch
        await server.aclose()


async def test_caller_catches_the_timeout_error_its_callee_raised(app: Dispatch) -> None:
    attempts: list[int] = []

    @app.function
    async def fetch() -> str:
        attempts.append(1)
        raise TimeoutError("the upstream service is slow")

    @app.function
    async def caller() -> str:
        try:
            await fetch()
        except TimeoutError as exc:
            return f"caught {type(exc).__name__}: {exc}"
        return "not caught"

    dispatch_id = await caller.dispatch()
    result = await app.client.result(dispatch_id, timeout=20)
    assert result == "caught TimeoutError: the upstream service is slow"
    assert len(attempts) == 4  # retried as a TIMEOUT, then final


async def test_callee_cancelled_is_an_error_the_caller_catches_at_once(app: Dispatch) -> None:
    attempts: list[int] = []

    @app.function
    async def quitter() -> str:
        attempts.append(1)
        raise asyncio.CancelledError("gave up")

    @app.function
    async def caller() -> str:
        try:
            await quitter()
        except errors.RemoteError as exc:
            # Still running: the callee's cancellation did not cancel this task.
            await asyncio.sleep(0)
            return f"caught {exc.type_name}"
        return "not caught"

    dispatch_id = await caller.dispatch()
    assert await app.client.result(dispatch_id, timeout=20) == "caught CancelledError"
    assert len(attempts) == 1  # asyncio does not restart a cancelled task; neither do we


def test_dispatch_ids_are_ordered_unique_and_not_shared_with_a_forked_process() -> None:
    ids = _Ids()
    made = [ids.next() for _ in range(1000)]  # several draws of random bytes
    assert len(set(made)) == 1000
    assert made == sorted(made)  # milliseconds, then a counter
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    if not hasattr(os, "fork"):
        return
    read, write = os.pipe()
    with warnings.catch_warnings():
        # The child only writes to a pipe and exits: no lock of another thread matters.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next id, from what its parent drew before the fork
        os.write(write, ids.next()[16:].encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(theirs) == 16
    assert theirs != ids.next()[16:]
