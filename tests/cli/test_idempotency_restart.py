"""A keyed submission sent again across a SIGKILL of ``dispatch-aio server`` makes one call."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from e2e.harness import Server, Starter, start_server

from dispatch_aio import Call, Client
from dispatch_aio.proto.v1 import inspect_pb2

UNSERVED = "http://127.0.0.1:9"  # the call's endpoint: never reached, the call stays pending


async def submit(server: Server, key: str) -> str:
    async with Client(
        api_key=server.api_key, api_url=server.api_url, endpoint_url=UNSERVED, env={}
    ) as client:
        (dispatch_id,) = await client.dispatch([Call("f", (1,), idempotency_key=key)])
        return dispatch_id


async def listed(server: Server) -> list[str]:
    async with Client(api_key=server.api_key, api_url=server.api_url, env={}) as client:
        body = inspect_pb2.ListCallsRequest().SerializeToString()
        url = server.api_url + "/dispatch_aio.v1.InspectService/ListCalls"
        payload = await client._post(url, server.api_key, body, 5.0)
    return [c.dispatch_id for c in inspect_pb2.ListCallsResponse.FromString(payload).calls]


def test_a_key_survives_a_sigkill_of_the_server(procs: Starter, tmp_path: Path) -> None:
    args = ("--port", "0", "--data-dir", str(tmp_path / "data"), "--idempotency-retention", "3600")
    server = start_server(procs, *args)
    first = asyncio.run(submit(server, "order-7"))
    assert asyncio.run(submit(server, "order-7")) == first
    server.proc.send(signal.SIGKILL)
    server.proc.wait(10)
    again = start_server(procs, *args)
    assert asyncio.run(submit(again, "order-7")) == first
    assert asyncio.run(listed(again)) == [first]
    assert asyncio.run(submit(again, "order-8")) != first
