"""Slow and half-open clients cannot starve the endpoint of connections."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from endpoint_driver import Driver, Outcome
from test_endpoint import build_dispatch

from dispatch_aio import Status

HALF_SENT = b"POST /dispatch.sdk.v1.FunctionService/Run HTTP/1.1\r\nHost: x\r\nContent-Le"


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def half_open(port: int, count: int) -> list[Stream]:
    """Open `count` connections that each send part of a request's headers, then stall."""
    streams = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HALF_SENT)
        streams.append((reader, writer))
    await asyncio.gather(*(w.drain() for _, w in streams))
    return streams


async def close_all(streams: list[Stream]) -> None:
    for _, writer in streams:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in streams), return_exceptions=True)


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except (TimeoutError, ConnectionError):
        return False


@pytest.mark.parametrize(("max_connections", "flood"), [(None, 1100), (50, 300)])
async def test_calls_flow_during_a_flood_of_half_open_connections(
    max_connections: int | None, flood: int, caplog: pytest.LogCaptureFixture
) -> None:
    dispatch = build_dispatch(idle_timeout=2.0, max_connections=max_connections)
    async with await dispatch.start() as server:
        streams = await half_open(server.port, flood)
        try:
            started = time.monotonic()
            # A new client (no pooled connection) gets through while the flood holds on.
            async with aiohttp.ClientSession() as session:
                driver = Driver(session, server.url)
                outcomes = await asyncio.gather(*(driver.call("add", i, 1) for i in range(20)))
            assert outcomes == [Outcome(Status.OK, i + 1) for i in range(20)]
            assert time.monotonic() - started < 1.5  # before the idle timeout frees anything
            # Every stalled connection is closed by the server within the idle timeout.
            closed = await asyncio.gather(*(closed_by_server(r, 6.0) for r, _ in streams))
            assert all(closed), f"{closed.count(False)} of {flood} still open"
        finally:
            await close_all(streams)
    if max_connections is not None:
        evictions = [r for r in caplog.records if "closed" in r.getMessage()]
        assert len(evictions) == 1, "reported once per minute, not per connection"
        assert evictions[0].levelno == logging.WARNING


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        build_dispatch(idle_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        build_dispatch(max_connections=0)
