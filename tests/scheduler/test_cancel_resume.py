"""The resume that lets a cancelled call clean up, seen from scripted endpoints.

An endpoint whose state is a journal of this SDK gets one resume marked with the
``Dispatch-Aio-Cancel`` header; the call ends cancelled whatever it answers, or when
the grace period is up. An endpoint of another SDK (any other state) gets nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from google.protobuf import any_pb2

from dispatch_aio.durable._journal import CANCEL_HEADER, JOURNAL_TYPE_URL
from dispatch_aio.errors import CancelledCallError
from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.scheduler import Scheduler

from .scripted import ScriptedEndpoint, call, ok, poll, resumed

CANCELLED = CancelledCallError.error_type
JOURNAL = any_pb2.Any(type_url=JOURNAL_TYPE_URL, value=b"")


async def _suspend_and_cancel(
    endpoint: ScriptedEndpoint,
    scheduler: Scheduler,
    answer: Callable[[function_pb2.RunRequest], Awaitable[function_pb2.RunResponse]],
    state: bytes | any_pb2.Any,
) -> tuple[str, float]:
    async def script(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if resumed(req):
            return await answer(req)
        return poll(max_wait=3600, state=state)

    endpoint.on("f", script)
    (dispatch_id,) = await scheduler.dispatch([call("f", endpoint=endpoint.url)])
    await endpoint.wait_for(lambda: len(endpoint.received) == 1)
    await asyncio.sleep(0.05)  # the Poll is recorded
    started = time.monotonic()
    assert await scheduler.cancel(dispatch_id) == 1
    took = time.monotonic() - started
    result = await asyncio.wait_for(scheduler.wait(dispatch_id), 5)
    assert result.error.type == CANCELLED
    return dispatch_id, took


@pytest.mark.parametrize(
    "answer",
    [
        poll([call("child", correlation_id=1)], state=JOURNAL),
        ok("finished anyway"),
    ],
    ids=["poll-with-calls", "result"],
)
async def test_the_answer_to_the_cancelling_resume_is_ignored(
    endpoint: ScriptedEndpoint,
    make_scheduler: Callable[..., Awaitable[Scheduler]],
    answer: function_pb2.RunResponse,
) -> None:
    async def respond(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        return answer

    endpoint.on("child", lambda req: ok("child ran"))
    scheduler = await make_scheduler()
    await _suspend_and_cancel(endpoint, scheduler, respond, JOURNAL)
    (first, resume) = endpoint.received
    assert CANCEL_HEADER not in first.headers
    assert resume.resumed and resume.headers.get(CANCEL_HEADER) == "1"
    await asyncio.sleep(0.1)
    assert not endpoint.requests_for("child")  # the Poll's calls were never made
    assert scheduler.unfinished == 0


async def test_no_answer_within_the_grace_period(
    endpoint: ScriptedEndpoint, make_scheduler: Callable[..., Awaitable[Scheduler]]
) -> None:
    async def hang(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        await asyncio.sleep(5)
        return ok("too late")

    scheduler = await make_scheduler(cancel_grace=0.2)
    _, took = await _suspend_and_cancel(endpoint, scheduler, hang, JOURNAL)
    assert 0.15 <= took < 2.0
    assert len(endpoint.received) == 2


async def test_a_call_of_another_sdk_ends_at_once(
    endpoint: ScriptedEndpoint, make_scheduler: Callable[..., Awaitable[Scheduler]]
) -> None:
    async def never(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        raise AssertionError("a call of another SDK is not resumed to be cancelled")

    scheduler = await make_scheduler()
    await _suspend_and_cancel(endpoint, scheduler, never, b"dispatch-py state")
    await asyncio.sleep(0.1)
    assert len(endpoint.received) == 1


async def test_a_grace_of_zero_ends_at_once(
    endpoint: ScriptedEndpoint, make_scheduler: Callable[..., Awaitable[Scheduler]]
) -> None:
    async def never(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        raise AssertionError("no resume without a grace period")

    scheduler = await make_scheduler(cancel_grace=0)
    await _suspend_and_cancel(endpoint, scheduler, never, JOURNAL)
    await asyncio.sleep(0.1)
    assert len(endpoint.received) == 1


def test_a_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="cancel_grace"):
        Scheduler(api_key="k", cancel_grace=-1)
