"""Durable events on the embedded scheduler: wait_event, send_event, once, timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from endpoint_driver import Driver

import dispatch_aio
from dispatch_aio import Dispatch, Function, Status
from dispatch_aio.errors import (
    CancelledCallError,
    ClientError,
    DispatchTimeoutError,
    EventAlreadyResolvedError,
    PermanentError,
)


class Refused(Exception):
    """The error an event is resolved with in these tests."""


def app(tmp_path: Path) -> tuple[Dispatch, Function[[str, float], str], dict[str, list[str]]]:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))
    seen: dict[str, list[str]] = {"waiting": []}

    @dispatch.function
    async def approve(key: str, seconds: float) -> str:
        seen["waiting"].append(key)
        try:
            value = await dispatch_aio.wait_event(key, timeout=seconds)
        except TimeoutError as exc:
            return f"timed out: {exc}"
        except Refused as exc:
            return f"refused: {exc}"
        return f"got {value!r}"

    return dispatch, approve, seen


async def until(predicate: Callable[[], bool], seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - state changed by the scheduler's tasks
            await asyncio.sleep(0.01)


async def test_waiters_receive_the_value_once_and_late_waiters_at_once(tmp_path: Path) -> None:
    dispatch, approve, seen = app(tmp_path)
    async with await dispatch.start():
        client = dispatch.client
        first = await approve.dispatch("order-1", 60.0)
        second = await approve.dispatch("order-1", 60.0)
        await until(lambda: seen["waiting"].count("order-1") == 2)
        engine = dispatch._embedded.scheduler._engine  # type: ignore[union-attr]
        await until(lambda: engine.event_waiters == 2)
        assert await client.send_event("order-1", {"approved": True}) == 2
        assert await client.result(first, timeout=10) == "got {'approved': True}"
        assert await client.result(second, timeout=10) == "got {'approved': True}"
        # Resolved once: a second resolution is refused and changes nothing.
        with pytest.raises(EventAlreadyResolvedError, match="'order-1' is already resolved"):
            await client.send_event("order-1", "again")
        # A waiter that arrives after the resolution gets the first value at once.
        late = await approve.dispatch("order-1", 60.0)
        assert await client.result(late, timeout=10) == "got {'approved': True}"


async def test_an_event_resolved_with_an_error_raises_it_at_the_await(tmp_path: Path) -> None:
    dispatch, approve, seen = app(tmp_path)
    async with await dispatch.start():
        waiting = await approve.dispatch("order-2", 60.0)
        await until(lambda: "order-2" in seen["waiting"])
        await dispatch.client.send_event("order-2", error=Refused("no budget"))
        assert await dispatch.client.result(waiting, timeout=10) == "refused: no budget"


async def test_a_wait_times_out_with_timeout_error(tmp_path: Path) -> None:
    dispatch, approve, _ = app(tmp_path)
    async with await dispatch.start():
        started = time.monotonic()
        waiting = await approve.dispatch("order-3", 1.0)
        result = await dispatch.client.result(waiting, timeout=10)
        assert result == "timed out: the event 'order-3' was not sent within 1 s"
        assert 1.0 <= time.monotonic() - started < 5
        # Sent after the timeout: stored for later waiters, nobody is waiting now.
        assert await dispatch.client.send_event("order-3", 1) == 0


async def test_invalid_uses_are_refused_with_clear_errors(tmp_path: Path) -> None:
    dispatch, _, _ = app(tmp_path)
    with pytest.raises(RuntimeError, match="only inside a function run by Dispatch"):
        await dispatch_aio.wait_event("k")
    with pytest.raises(ValueError, match="non-empty"):
        await dispatch_aio.wait_event("")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        await dispatch_aio.wait_event("k", timeout=0)
    async with await dispatch.start():
        with pytest.raises(ClientError, match="invalid event key") as info:
            await dispatch.client.send_event("x" * 300, 1)
        assert info.value.code == "invalid_argument"
        with pytest.raises(ValueError, match="a value or an error, not both"):
            await dispatch.client.send_event("k", 1, error=PermanentError("x"))
    assert issubclass(DispatchTimeoutError, TimeoutError)


async def test_a_scheduler_that_runs_the_wait_as_a_call_gets_a_clear_error() -> None:
    # The test driver plays a Dispatch scheduler that knows no events: it sends the
    # reserved wait function to the endpoint like any call.
    dispatch = Dispatch(env={}, endpoint_addr="127.0.0.1:0", api_url="http://127.0.0.1:9")

    @dispatch.function(name="approve")
    async def approve(key: str) -> str:
        return str(await dispatch_aio.wait_event(key))

    async with dispatch, await dispatch.start() as server, aiohttp.ClientSession() as session:
        outcome = await Driver(session, server.url).call("approve", "order-4")
    assert outcome.status is Status.PERMANENT_ERROR
    assert isinstance(outcome.error, PermanentError)
    assert "wait_event() needs dispatch_aio's scheduler" in str(outcome.error)


async def test_a_cancelled_waiting_call_stops_waiting(tmp_path: Path) -> None:
    dispatch, approve, seen = app(tmp_path)
    async with await dispatch.start():
        client = dispatch.client
        waiting = await approve.dispatch("order-5", 600.0)
        await until(lambda: "order-5" in seen["waiting"])
        engine = dispatch._embedded.scheduler._engine  # type: ignore[union-attr]
        await until(lambda: engine.event_waiters == 1)
        assert await client.cancel(waiting) is True
        with pytest.raises(CancelledCallError):
            await client.result(waiting, timeout=10)
        assert engine.event_waiters == 0
        assert await client.send_event("order-5", "late") == 0
