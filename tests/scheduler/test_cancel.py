"""Cancellation: a call and its descendants stop, finished calls are left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dispatch_aio import Client
from dispatch_aio.errors import CancelledCallError, ClientError
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, status_pb2
from dispatch_aio.scheduler import Scheduler

from .scripted import API_KEY, ScriptedEndpoint, call, eventually, ok, poll, resumed

CANCELLED = CancelledCallError.error_type


def client_for(scheduler: Scheduler) -> Client:
    assert scheduler.url is not None
    return Client(api_key=API_KEY, api_url=scheduler.url, endpoint_url="http://x.test", env={})


async def test_cancelling_a_tree_of_100_calls_stops_every_one(
    endpoint: ScriptedEndpoint,
    make_scheduler: Callable[..., Awaitable[Scheduler]],
    tmp_path: Path,
) -> None:
    release = asyncio.Event()

    async def leaf(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if req.function == "stuck":
            await release.wait()  # a Run request in flight when the tree is cancelled
        return poll(max_wait=3600)  # suspended, waiting for nothing

    endpoint.on("waits", leaf)
    endpoint.on("stuck", leaf)
    children = [call("waits", endpoint=endpoint.url, correlation_id=i) for i in range(98)]
    children.append(call("stuck", endpoint=endpoint.url, correlation_id=98))
    endpoint.on(
        "root",
        lambda req: poll(max_wait=3600) if resumed(req) else poll(children, min_results=99),
    )
    scheduler = await make_scheduler(str(tmp_path / "calls.db"))
    await scheduler.serve()
    (root,) = await scheduler.dispatch([call("root", endpoint=endpoint.url)])
    await endpoint.wait_for(lambda: len(endpoint.received) == 100)
    await eventually(lambda: len(scheduler.running()) == 1)  # "stuck" runs, others wait
    async with client_for(scheduler) as client:
        started = time.monotonic()
        assert await client.cancel(root) is True
        assert time.monotonic() - started < 1.0
        assert scheduler.unfinished == 0
        with pytest.raises(CancelledCallError, match=f"call {root} \\(root\\) was cancelled"):
            await client.result(root, timeout=5)
        # Finished already: a no-op answer, not an error.
        assert await client.cancel(root) is False
    release.set()
    await asyncio.sleep(0.1)
    assert len(endpoint.received) == 100  # no attempt after the cancellation


async def test_a_cancelled_child_fails_in_its_parent(
    endpoint: ScriptedEndpoint, make_scheduler: Callable[..., Awaitable[Scheduler]]
) -> None:
    endpoint.on("child", lambda req: poll(max_wait=3600))

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", endpoint=endpoint.url, correlation_id=7)])
        (result,) = req.poll_result.results
        return ok(f"{result.correlation_id}:{result.error.type}")

    endpoint.on("parent", parent)
    scheduler = await make_scheduler()
    (parent_id,) = await scheduler.dispatch([call("parent", endpoint=endpoint.url)])
    await endpoint.wait_for(lambda: len(endpoint.requests_for("child")) == 1)
    child_id = endpoint.requests_for("child")[0].request.dispatch_id
    assert await scheduler.cancel(child_id) == 1
    result = await asyncio.wait_for(scheduler.wait(parent_id), 5)
    assert result.output.value.decode().endswith(f"7:{CANCELLED}")


async def test_unknown_ids_are_a_clear_error(
    make_scheduler: Callable[..., Awaitable[Scheduler]],
) -> None:
    scheduler = await make_scheduler()
    await scheduler.serve()
    with pytest.raises(LookupError, match="no call with dispatch id 'nope'"):
        await scheduler.cancel("nope")
    async with client_for(scheduler) as client:
        with pytest.raises(ClientError, match="no call with dispatch id 'nope'") as info:
            await client.cancel("nope")
    assert info.value.code == "not_found"


async def test_a_cancelled_call_stays_cancelled_after_a_restart(
    make_scheduler: Callable[..., Awaitable[Scheduler]],
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "calls.db")
    first = await make_scheduler(path)
    # Its endpoint refuses connections: the call is retried until it is cancelled.
    (dispatch_id,) = await first.dispatch(
        [call_pb2.Call(function="later", endpoint="http://127.0.0.1:9")]
    )
    assert await first.cancel(dispatch_id) == 1
    await first.close()
    again = await make_scheduler(path)
    assert again.unfinished == 0
    result = await again.wait(dispatch_id)
    assert result.error.type == CANCELLED
    done = await again.wait_done(dispatch_id)
    assert done is not None and done.status == status_pb2.STATUS_PERMANENT_ERROR
