"""Cancelling a suspended call runs its cleanup: CancelledError at its pending await.

Real SQLite files, the embedded scheduler (requests handed over in memory) and a
scheduler reaching the app over HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dispatch_aio import Dispatch
from dispatch_aio.errors import CancelledCallError
from dispatch_aio.scheduler import Scheduler

API_KEY = "test-key"


def _cleanup_function(app: Dispatch, seen: list[str]) -> Any:
    @app.function(name="tidy")
    async def tidy() -> str:
        seen.append("started")
        try:
            await asyncio.sleep(3600)  # a durable timer: the call is suspended
        except asyncio.CancelledError:
            seen.append("except")
            raise
        finally:
            seen.append("finally")
        return "slept"

    return tidy


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - set by a durable function
            await asyncio.sleep(0.01)


async def test_cancel_raises_cancelled_error_at_the_pending_await(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    seen: list[str] = []
    tidy = _cleanup_function(app, seen)
    async with await app.start():
        dispatch_id = await tidy.dispatch()
        await _until(lambda: seen == ["started"])
        await asyncio.sleep(0.1)  # let it suspend
        assert await app.client.cancel(dispatch_id) is True
        assert seen == ["started", "except", "finally"]
        with pytest.raises(CancelledCallError, match=f"call {dispatch_id} \\(tidy\\)"):
            await app.client.result(dispatch_id, timeout=5)
        assert await app.client.cancel(dispatch_id) is False
        await asyncio.sleep(0.1)
        assert seen == ["started", "except", "finally"]  # exactly once


async def test_a_result_after_the_cancellation_is_dropped(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    seen: list[str] = []

    @app.function(name="swallow")
    async def swallow() -> str:
        seen.append("started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("except")
        return "returned anyway"

    async with await app.start():
        dispatch_id = await swallow.dispatch()
        await _until(lambda: seen == ["started"])
        await asyncio.sleep(0.1)
        assert await app.client.cancel(dispatch_id) is True
        assert seen == ["started", "except"]
        with pytest.raises(CancelledCallError):
            await app.client.result(dispatch_id, timeout=5)


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """The embedded scheduler gives a cancelled call 0.3 s to clean up."""
    grace = 0.3
    monkeypatch.setattr(
        "dispatch_aio._embedded.Scheduler", functools.partial(Scheduler, cancel_grace=grace)
    )
    return grace


async def test_a_call_that_sleeps_again_ends_cancelled(tmp_path: Path, short_grace: float) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    seen: list[str] = []

    @app.function(name="stubborn")
    async def stubborn() -> str:
        seen.append("started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("except")
            await asyncio.sleep(3600)  # ignores the cancellation
            seen.append("woke")
        return "never"

    async with await app.start():
        dispatch_id = await stubborn.dispatch()
        await _until(lambda: seen == ["started"])
        await asyncio.sleep(0.1)
        assert await app.client.cancel(dispatch_id) is True
        with pytest.raises(CancelledCallError):
            await app.client.result(dispatch_id, timeout=5)
        assert seen == ["started", "except"]


async def test_a_slow_cleanup_is_cut_at_the_grace_period(
    tmp_path: Path, short_grace: float
) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    seen: list[str] = []

    @app.function(name="slow")
    async def slow() -> str:
        seen.append("started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("except")
            await asyncio.sleep(0.9)  # waited live, past the grace period
            seen.append("cleaned up late")
            await asyncio.sleep(3600)
        return "never"

    async with await app.start():
        dispatch_id = await slow.dispatch()
        await _until(lambda: seen == ["started"])
        await asyncio.sleep(0.1)
        started = time.monotonic()
        assert await app.client.cancel(dispatch_id) is True
        took = time.monotonic() - started
        assert short_grace * 0.9 <= took < 0.8
        with pytest.raises(CancelledCallError):
            await app.client.result(dispatch_id, timeout=5)
        assert seen == ["started", "except"]


@pytest.fixture
async def over_http(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, Dispatch]]:
    """A scheduler on a database file, and an app it reaches over HTTP."""
    scheduler = Scheduler(str(tmp_path / "db"), api_key=API_KEY)
    await scheduler.start()
    api_url = await scheduler.serve("127.0.0.1", 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = Dispatch(
        api_key=API_KEY,
        api_url=api_url,
        endpoint_url=f"http://127.0.0.1:{port}",
        endpoint_addr=f"127.0.0.1:{port}",
        verification_key=scheduler.verification_key,
    )
    try:
        yield scheduler, app
    finally:
        await scheduler.close()


async def test_cancel_over_http(over_http: tuple[Scheduler, Dispatch]) -> None:
    _, app = over_http
    seen: list[str] = []
    tidy = _cleanup_function(app, seen)
    async with await app.start():
        dispatch_id = await tidy.dispatch()
        await _until(lambda: seen == ["started"])
        await asyncio.sleep(0.1)
        assert await app.client.cancel(dispatch_id) is True
        assert seen == ["started", "except", "finally"]
        with pytest.raises(CancelledCallError):
            await app.client.result(dispatch_id, timeout=5)
