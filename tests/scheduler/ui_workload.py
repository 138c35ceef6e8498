"""A real workload for the web UI's tests: a served scheduler and an app it runs over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from dispatch_aio import Dispatch, wait_event
from dispatch_aio._codec import encode_input
from dispatch_aio.proto.sdk.v1 import call_pb2
from dispatch_aio.scheduler import Scheduler

API_KEY = "ui-test-key"
SCRIPT = "<script>alert(1)</script>"


@dataclass
class Workload:
    scheduler: Scheduler
    api_url: str
    dispatch: Dispatch
    endpoint: str
    release: asyncio.Event
    """Set it to let the `waits` calls finish."""

    async def submit(self, function: str, *args: object) -> str:
        """Submit a top-level call, as a client would; return its dispatch id."""
        call = call_pb2.Call(
            function=function, endpoint=self.endpoint, input=encode_input(args, {})
        )
        (dispatch_id,) = await self.scheduler.dispatch([call])
        return dispatch_id

    async def finish(self, dispatch_id: str) -> None:
        async with asyncio.timeout(30):
            await self.scheduler.wait(dispatch_id)


@asynccontextmanager
async def serve_workload() -> AsyncIterator[Workload]:
    """Start a scheduler served on loopback and an app whose calls it runs."""
    async with Scheduler(":memory:", api_key=API_KEY) as scheduler:
        api_url = await scheduler.serve("127.0.0.1", 0)
        dispatch = Dispatch(
            api_url=api_url,
            api_key=API_KEY,
            verification_key=scheduler.verification_key,
            endpoint_addr="127.0.0.1:0",
            env={},
            live_timer_threshold=0.0,  # sleeps suspend: calls show as suspended
        )
        release = asyncio.Event()

        @dispatch.function(name="square")
        async def square(x: int) -> int:
            return x * x

        @dispatch.function(name="shout")
        async def shout() -> str:
            return SCRIPT

        @dispatch.function(name="explode")
        async def explode(what: str) -> None:
            raise ValueError(f"<b>{what}</b> went wrong")

        @dispatch.function(name="fanout")
        async def fanout(n: int) -> dict[str, Any]:
            squares = await asyncio.gather(*(square(i) for i in range(n)))
            try:
                await explode("child")
            except ValueError as exc:
                caught = str(exc)
            return {"sum": sum(squares), "caught": caught, "html": await shout()}

        @dispatch.function(name="approval")
        async def approval(order: str) -> Any:
            return await wait_event(f"approve-{order}")

        @dispatch.function(name="waits")
        async def waits(label: str) -> str:
            while not release.is_set():  # noqa: ASYNC110 - each sleep suspends the call
                await asyncio.sleep(0.2)
            return label

        async with await dispatch.start() as server:
            yield Workload(scheduler, api_url, dispatch, server.url, release)
            release.set()
