"""Scenario 4: calls across the two SDKs, each call's ``endpoint`` naming the other app.

Our scheduler runs both applications and both verify its signatures. Our functions call
dispatch-py functions with `call_dispatch_py` (input: pickled dispatch.proto.Arguments);
dispatch-py functions call ours through stubs registered in a dispatch-py Registry whose
endpoint is ours (input: the same Arguments), or with a low-level ``dispatch.Call`` whose
input is a bare value.
"""

from __future__ import annotations

import asyncio

import pytest
from ports import free_port

from dispatch_aio import Call, Client, Dispatch
from dispatch_aio.interop import call_dispatch_py, dispatch_py_input
from dispatch_aio.proto.sdk.v1 import call_pb2
from dispatch_aio.scheduler import Scheduler

from .harness import API_KEY, StartPeer, outcome, start_app

pytestmark = pytest.mark.timeout(300)  # the first test may create the virtualenv


def our_app(scheduler: Scheduler, port: int, peer_url: str) -> Dispatch:
    dispatch = Dispatch(
        env={},
        api_url=scheduler.url,
        endpoint_addr=f"127.0.0.1:{port}",
        verification_key=scheduler.verification_key,
    )

    @dispatch.function(name="triple")
    async def triple(x: int) -> int:
        return 3 * x

    @dispatch.function(name="explode")
    async def explode(message: str) -> None:
        raise ValueError(message)

    @dispatch.function(name="inner")
    async def inner(n: int, *, label: str) -> str:
        return f"{label}: {n}"

    @dispatch.function(name="relay")
    async def relay(x: int) -> int:
        return await call_dispatch_py(peer_url, "double", x) + 1

    @dispatch.function(name="fan_relay")
    async def fan_relay(xs: list[int]) -> list[int]:
        return list(await asyncio.gather(*(call_dispatch_py(peer_url, "double", x) for x in xs)))

    @dispatch.function(name="outer")
    async def outer(n: int) -> dict[str, object]:
        return {"outer": n, "middle": await call_dispatch_py(peer_url, "middle", n)}

    @dispatch.function(name="catch_theirs")
    async def catch_theirs(message: str) -> str:
        try:
            await call_dispatch_py(peer_url, "fail", message)
        except ValueError as exc:
            return f"dispatch_aio caught {type(exc).__name__}: {exc}"
        return "not raised"

    return dispatch


async def test_functions_of_each_sdk_await_functions_of_the_other(
    scheduler: Scheduler, start_peer: StartPeer
) -> None:
    assert scheduler.url is not None
    port = free_port()
    our_url = f"http://127.0.0.1:{port}"
    peer = await start_app(start_peer, scheduler, AIO_ENDPOINT_URL=our_url)
    ours = {
        "relay": Call("relay", (20,)),
        "fan_relay": Call("fan_relay", ([1, 2, 3],)),
        "outer": Call("outer", (1,)),
        "catch_theirs": Call("catch_theirs", ("boom",)),
    }
    theirs = {
        "via_aio": ((4,), {}),
        "bare_via_aio": ((5,), {}),
        "gather_aio": (([1, 2, 3],), {}),
        "catch_aio": (("bang",), {}),
    }
    client = Client(api_url=scheduler.url, api_key=API_KEY, endpoint_url=our_url, env={})
    async with await our_app(scheduler, port, peer.url).start(), client:
        ids = dict(zip(ours, await client.dispatch(ours.values()), strict=True))
        ids |= dict(
            zip(
                theirs,
                await scheduler.dispatch(
                    [
                        call_pb2.Call(
                            function=name, endpoint=peer.url, input=dispatch_py_input(*args)
                        )
                        for name, args in theirs.items()
                    ]
                ),
                strict=True,
            )
        )
        try:
            async with asyncio.timeout(20):
                results = {label: await scheduler.wait(id) for label, id in ids.items()}
        except TimeoutError:
            raise AssertionError(f"calls did not finish\n{peer.peer.dump()}") from None

    assert {label: outcome(result) for label, result in results.items()} == {
        "relay": 41,
        "fan_relay": [2, 4, 6],
        # dispatch-py returns lists as google.protobuf.Value, so numbers come back floats.
        "outer": {"outer": 1, "middle": [1.0, "from dispatch-py: 2"]},
        "catch_theirs": "dispatch_aio caught ValueError: boom",
        "via_aio": 13,
        "bare_via_aio": 15,
        "gather_aio": [3.0, 6.0, 9.0],
        "catch_aio": "dispatch-py caught ValueError: bang",
    }
