"""Objects of the host loop (an app-wide aiohttp session, a connection pool) used inside
durable functions: their operations run on the host loop, as forwarded I/O does.

The embedded scheduler on a real SQLite file runs the calls; the session talks over
real HTTP to an aiohttp server on loopback. No run is kept live between requests
(``cache_size=0``), so every resume replays, and uses the shared objects again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from endpoint_driver import serve_app

from dispatch_aio import Dispatch, Function, run_on_host
from dispatch_aio.errors import HostLoopError


class Pool:
    """Shaped like asyncpg's pool: made on one loop, its methods await that loop's futures."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queries: list[str] = []

    async def fetchval(self, query: str) -> int:
        reply: asyncio.Future[int] = self._loop.create_future()
        # The answer arrives from the loop the pool belongs to, as a socket read would.
        self._loop.call_later(0.01, reply.set_result, len(query))
        self.queries.append(query)
        return await reply

    def acquire(self) -> _Acquire:
        return _Acquire(self)


class _Acquire:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def __aenter__(self) -> Pool:
        ready: asyncio.Future[None] = self._pool._loop.create_future()
        self._pool._loop.call_soon(ready.set_result, None)
        await ready
        return self._pool

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.json_response({"hello": request.query.get("name", "")})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner, url = await serve_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


def app_with_a_step(tmp_path: Path) -> tuple[Dispatch, Function[[int], int]]:
    """An app that keeps no run live (every resume replays), and a function to call."""
    dispatch = Dispatch(env={}, data_dir=str(tmp_path), cache_size=0)

    @dispatch.function(name="step")
    async def step(x: int) -> int:
        return x + 1

    return dispatch, step


# Python 3.14 keeps one current task per thread: aiohttp's timeouts cannot find the
# function's task on the session's loop (see test_a_shared_session_on_python_3_14).
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="asyncio's current task is per thread")
async def test_a_shared_session_and_pool_work_inside_durable_functions(
    tmp_path: Path, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    dispatch, step = app_with_a_step(tmp_path)
    pool = Pool()

    async with aiohttp.ClientSession() as session:  # the app's own, made on the host loop

        @dispatch.function(name="greet")
        async def greet(name: str) -> dict[str, Any]:
            async with session.get(f"{server}/hello", params={"name": name}) as resp:
                first = await resp.json()
            after = await step(1)  # suspends: the run replays and requests again
            async with session.get(f"{server}/hello", params={"name": "again"}) as resp:
                second = await resp.json()
            timeout = aiohttp.ClientTimeout(total=5)  # its timer looks for the task
            async with session.get(f"{server}/hello", timeout=timeout) as resp:
                assert resp.status == 200
            async with pool.acquire() as conn:
                size = await conn.fetchval("select 1")
            return {"first": first, "after": after, "second": second, "size": size}

        async with await dispatch.start():
            result = await dispatch.client.result(await greet.dispatch("Ada"), timeout=30)
            results = await asyncio.gather(
                *[
                    dispatch.client.result(await greet.dispatch(str(i)), timeout=30)
                    for i in range(5)
                ]
            )
    gc.collect()
    assert result == {
        "first": {"hello": "Ada"},
        "after": 2,
        "second": {"hello": "again"},
        "size": 8,
    }
    assert [r["first"] for r in results] == [{"hello": str(i)} for i in range(5)]
    assert "select 1" in pool.queries
    # No stray "Exception in callback ..." from a socket of the wrong loop.
    assert errors == []
    assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    loop.set_exception_handler(None)


@pytest.mark.skipif(sys.version_info < (3, 14), reason="asyncio's current task is per loop")
async def test_a_shared_session_on_python_3_14_says_what_to_do_and_run_on_host_works(
    tmp_path: Path, server: str
) -> None:
    dispatch, step = app_with_a_step(tmp_path)
    pool = Pool()

    async with aiohttp.ClientSession() as session:  # the app's own, made on the host loop

        async def fetch(name: str) -> Any:
            async with session.get(f"{server}/hello", params={"name": name}) as resp:
                return await resp.json()

        @dispatch.function(name="direct")
        async def direct() -> Any:
            return await fetch("direct")

        @dispatch.function(name="on_host")
        async def on_host(name: str) -> dict[str, Any]:
            first = await run_on_host(fetch(name))
            after = await step(1)  # suspends: the run replays and requests again
            async with pool.acquire() as conn:  # a pool's futures are still bridged
                size = await conn.fetchval("select 1")
            return {"first": first, "after": after, "size": size}

        async with await dispatch.start():
            result = await dispatch.client.result(await on_host.dispatch("Ada"), timeout=30)
            with pytest.raises(HostLoopError) as info:
                await dispatch.client.result(await direct.dispatch(), timeout=30)
    assert result == {"first": {"hello": "Ada"}, "after": 2, "size": 8}
    assert "aiohttp ClientSession created outside it" in str(info.value)
    assert "create the session inside the function" in str(info.value)
    assert "run_on_host()" in str(info.value)
