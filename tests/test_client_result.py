"""Client.result(): waiting for a call's result through the local scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from ports import free_port

from dispatch_aio import Dispatch
from dispatch_aio._client import _not_done
from dispatch_aio.errors import ClientError, DispatchTimeoutError, PermanentError
from dispatch_aio.proto.v1.inspect_pb2 import (
    CALL_STATE_PENDING,
    CALL_STATE_RUNNING,
    CALL_STATE_SUSPENDED,
    CallInfo,
)
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


def _info(state: int, attempts: int, polls: int = 0, last_error: str = "") -> CallInfo:
    return CallInfo(
        dispatch_id="d1",
        function="f",
        state=state,  # type: ignore[arg-type]
        attempts=attempts,
        polls=polls,
        last_error=last_error,
    )


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (_info(CALL_STATE_PENDING, 0), "has not run after 1 s: the scheduler has made no attempt"),
        (
            _info(CALL_STATE_PENDING, 3, last_error="connection refused"),
            "has not run after 1 s: its 3 attempts failed, the last one with: connection "
            "refused; it is retried until it expires (is the app running",
        ),
        # The wait may end while a retry is in flight: the attempts before it say why.
        (
            _info(CALL_STATE_RUNNING, 4, last_error="connection refused"),
            "has not run after 1 s: its 3 attempts failed, the last one with: connection "
            "refused; another is in flight and it is retried until it expires",
        ),
        (
            _info(CALL_STATE_RUNNING, 2, last_error="HTTP 503"),
            "has not run after 1 s: its 1 attempt failed, the last one with: HTTP 503",
        ),
        (_info(CALL_STATE_RUNNING, 1), "still runs after 1 s"),
        (_info(CALL_STATE_RUNNING, 5, polls=2, last_error="HTTP 503"), "still runs after 1 s"),
        (
            _info(CALL_STATE_PENDING, 5, polls=2, last_error="HTTP 503"),
            "has not finished after 1 s: its last attempt failed (HTTP 503) and it is retried",
        ),
        (_info(CALL_STATE_SUSPENDED, 3, polls=1), "still runs after 1 s"),
    ],
)
def test_a_timeout_says_why_the_call_has_no_result(info: CallInfo, expected: str) -> None:
    message = _not_done(info, 1)
    assert message.startswith("call d1 (f) ")
    assert expected in message
