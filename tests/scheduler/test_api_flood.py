"""Half-open clients cannot starve the scheduler API; slow bodies get a 408."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Iterator

import aiohttp
import pytest

from dispatch_aio.scheduler import _api

from .scripted import ScriptedEndpoint, ok, unpack_text
from .test_api import AUTH, DISPATCH, PROTO, Api, api, echo
from .test_store_failures import MakeScheduler

__all__ = ["api"]


@pytest.fixture
def low_file_limit() -> Iterator[None]:
    """A soft limit of 1024 open files, as on many machines, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-file limit is {hard}: too low for 1,100 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("low_file_limit")
async def test_calls_are_submitted_during_a_flood_of_half_open_connections(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler()
    url = await s.serve()  # raises the soft limit to the hard one
    port = int(url.rpartition(":")[2])
    streams = []
    for _ in range(1100):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /dispatch.sdk.v1.DispatchService/Dispatch HTTP/1.1\r\nHost: x\r\n")
        streams.append((reader, writer))
    try:
        endpoint.on("echo", lambda req: ok(unpack_text(req.input) + "!"))
        async with aiohttp.ClientSession() as http:
            api = Api(http, url, endpoint)
            async with asyncio.timeout(5):
                ids = await api.dispatch(*(echo(str(i), endpoint) for i in range(20)))
                results = [await api.wait(i) for i in ids]
        assert [unpack_text(r.output) for r in results] == [f"{i}!" for i in range(20)]
    finally:
        for _, writer in streams:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in streams), return_exceptions=True)


async def test_a_body_that_never_ends_is_a_408(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_api, "BODY_TIMEOUT", 0.3)
    port = int(api.url.rpartition(":")[2])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = {**AUTH, **PROTO, "Content-Length": "100", "Host": "x"}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST {DISPATCH} HTTP/1.1\r\n{head}\r\npartial".encode())
    try:
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            assert b" 408 " in status_line, status_line
            rest = await reader.read(4096)
        body = rest.split(b"\r\n\r\n", 1)[1]
        assert json.loads(body)["code"] == "deadline_exceeded"
    finally:
        writer.close()
        await writer.wait_closed()
