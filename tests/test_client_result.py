"""Client.result(): waiting for a call's result through the local scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from ports import free_port

from dispatch_aio import Dispatch
from dispatch_aio.errors import ClientError, DispatchTimeoutError, PermanentError
from dispatch_aio.scheduler import Scheduler


@pytest.fixture
async def app() -> AsyncIterator[Dispatch]:
    async with Scheduler(":memory:", api_key="test-key") as scheduler:
        api_url = await scheduler.serve("127.0.0.1", 0)
        port = free_port()
        dispatch = Dispatch(
            api_key="test-key",
            api_url=api_url,
            endpoint_url=f"http://127.0.0.1:{port}",
            endpoint_addr=f"127.0.0.1:{port}",
            verification_key=scheduler.verification_key,
        )
        async with dispatch:
            server = await dispatch.start()
            yield dispatch
            await server.aclose()


async def test_result_of_a_call(app: Dispatch) -> None:
    @app.function
    async def double(x: int) -> int:
        return 2 * x

    @app.function
    async def total(n: int) -> int:
        return sum(await asyncio.gather(*(double(i) for i in range(n))))

    dispatch_id = await total.dispatch(5)
    assert await app.client.result(dispatch_id, timeout=30) == 20


async def test_error_of_a_call(app: Dispatch) -> None:
    @app.function
    async def refuse(reason: str) -> None:
        raise PermanentError(reason)

    dispatch_id = await refuse.dispatch("no")
    with pytest.raises(PermanentError, match="no"):
        await app.client.result(dispatch_id, timeout=30)


async def test_timeout_and_unknown_id(app: Dispatch) -> None:
    @app.function
    async def nap() -> str:
        await asyncio.sleep(60)
        return "awake"

    dispatch_id = await nap.dispatch()
    with pytest.raises(DispatchTimeoutError, match="still runs"):
        await app.client.result(dispatch_id, timeout=0.3)
    with pytest.raises(ClientError):
        await app.client.result("no-such-id", timeout=1)
