"""Scenario 2: dispatch-py's client submits calls to our scheduler; our functions run them.

peers/client.py uses dispatch-py's own API (function stubs, ``.dispatch()``, batches, a
low-level ``Call``) with DISPATCH_API_URL and DISPATCH_API_KEY set to our scheduler's.
Its inputs are pickled dispatch.proto.Arguments (or a bare value), which our endpoint
decodes without dispatch-py installed.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from dispatch_aio import Dispatch
from dispatch_aio.scheduler import Scheduler

from .harness import API_KEY, StartPeer, outcome

pytestmark = pytest.mark.timeout(300)  # the first test may create the virtualenv


def our_app(scheduler: Scheduler) -> Dispatch:
    dispatch = Dispatch(
        env={},
        api_url=scheduler.url,
        endpoint_addr="127.0.0.1:0",
        verification_key=scheduler.verification_key,
    )

    @dispatch.function(name="greet")
    async def greet(name: str) -> str:
        return f"Hello, {name}!"

    @dispatch.function(name="add")
    async def add(a: int, b: int = 0) -> int:
        return a + b

    @dispatch.function(name="double")
    async def double(x: int) -> int:
        return 2 * x

    @dispatch.function(name="total")
    async def total(xs: list[int]) -> int:
        return sum(await asyncio.gather(*(double(x) for x in xs)))

    return dispatch


async def test_calls_submitted_by_dispatch_py_run_on_our_functions(
    scheduler: Scheduler, start_peer: StartPeer
) -> None:
    assert scheduler.url is not None
    async with await our_app(scheduler).start() as server:
        client = await start_peer(
            "client.py",
            ready=None,
            DISPATCH_API_URL=scheduler.url,
            DISPATCH_API_KEY=API_KEY,
            DISPATCH_ENDPOINT_URL=server.url,
        )
        ids = json.loads(await client.line("ids"))
        assert await client.wait() == 0
        async with asyncio.timeout(20):
            results = {label: await scheduler.wait(id) for label, id in ids.items()}
    assert {label: outcome(result) for label, result in results.items()} == {
        "greet": "Hello, World!",
        "add": 3,
        "batch_greet": "Hello, batch!",
        "batch_total": 12,
        "primitive": "Hello, primitive!",
    }


async def test_dispatch_py_reports_our_refusal_of_its_api_key(
    scheduler: Scheduler, start_peer: StartPeer
) -> None:
    assert scheduler.url is not None
    client = await start_peer(
        "client.py",
        ready=None,
        DISPATCH_API_URL=scheduler.url,
        DISPATCH_API_KEY="wrong-key",
        DISPATCH_ENDPOINT_URL="http://127.0.0.1:9",
    )
    # dispatch-py turns our 401 into its own message naming the variable to fix.
    error = await client.line("error")
    assert error.startswith("PermissionError:"), error
    assert "DISPATCH_API_KEY" in error
    assert scheduler.unfinished == 0
