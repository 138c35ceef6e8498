"""The batch extension: Run requests made together travel in one exchange.

A real scheduler on a SQLite file sends to a Dispatch app mounted in an aiohttp
application of the test's own, or served as ASGI by uvicorn, behind a middleware that
records the path of every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from asgi_server import serve_asgi
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio import Call, Dispatch, FunctionPolicy
from dispatch_aio._batch import BATCH_HEADER, BATCH_PATH
from dispatch_aio._codec import encode_input
from dispatch_aio._endpoint import RUN_PATH
from dispatch_aio._signature import sign_request
from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.proto.v1 import batch_pb2
from dispatch_aio.scheduler import Scheduler

from .scripted import API_KEY, FAST_RETRY


class Served:
    """A Dispatch app mounted in an aiohttp application, and the paths it was sent."""

    def __init__(self, scheduler: Scheduler, dispatch: Dispatch, url: str) -> None:
        self.scheduler = scheduler
        self.dispatch = dispatch
        self.url = url
        self.paths: list[str] = []

    def count(self, path: str) -> int:
        return sum(1 for p in self.paths if p == path)


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture(params=["aiohttp", "asgi"])
async def serve(
    request: pytest.FixtureRequest, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> AsyncIterator[Serve]:
    """Start a scheduler and an app, with the batch route unless told otherwise."""
    cleanups: list[Callable[[], Awaitable[Any]]] = []

    async def make(register: Callable[[Dispatch], None], *, batch_route: bool = True) -> Served:
        scheduler = Scheduler(
            str(tmp_path / "db"), api_key=API_KEY, signing_key=signing_key, retry=FAST_RETRY
        )
        await scheduler.start()
        cleanups.append(scheduler.close)
        api_url = await scheduler.serve("127.0.0.1", 0)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        dispatch = Dispatch(
            api_key=API_KEY,
            api_url=api_url,
            endpoint_url=url,
            verification_key=scheduler.verification_key,
        )
        register(dispatch)
        served = Served(scheduler, dispatch, url)
        if request.param == "asgi":
            stack = contextlib.AsyncExitStack()
            await stack.enter_async_context(
                serve_asgi(_recording(served, dispatch.asgi(), batch_route), port=port)
            )
            cleanups.append(stack.aclose)
            return served

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            served.paths.append(request.path)
            return await handler(request)  # type: ignore[no-any-return]

        app = web.Application(middlewares=[record])
        routes = dispatch.routes()
        app.add_routes(routes if batch_route else routes[:1])  # the Run route comes first
        app.cleanup_ctx.append(dispatch.cleanup_ctx)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        cleanups.append(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return served

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()


def _recording(served: Served, endpoint: Any, batch_route: bool) -> Any:
    """The ASGI endpoint behind a recorder; without `batch_route`, as a framework
    that routes only the Run path to it."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            served.paths.append(scope["path"])
            if not batch_route and scope["path"] != RUN_PATH:
                start = {"type": "http.response.start", "status": 404, "headers": []}
                await send(start)
                await send({"type": "http.response.body", "body": b"Not Found"})
                return
        await endpoint(scope, receive, send)

    return app


def _fan_out(dispatch: Dispatch) -> None:
    @dispatch.function(name="square")
    async def square(i: int) -> int:
        return i * i

    @dispatch.function(name="fan_out")
    async def fan_out(n: int) -> int:
        return sum(await asyncio.gather(*(square(i) for i in range(n))))


async def test_children_of_a_gather_travel_in_batches(serve: Serve) -> None:
    served = await serve(_fan_out)
    dispatch_id = (await served.dispatch.client.dispatch([Call("fan_out", (100,))]))[0]
    assert await served.dispatch.client.result(dispatch_id, timeout=30) == sum(
        i * i for i in range(100)
    )
    # The first answer announces the route; the children go together after that.
    assert served.count(BATCH_PATH) >= 1
    assert served.count(RUN_PATH) < 50, served.paths


async def test_answers_of_a_batch_come_as_their_runs_end(serve: Serve) -> None:
    gate = asyncio.Event()

    def register(dispatch: Dispatch) -> None:
        @dispatch.function(name="quick")
        async def quick(i: int) -> int:
            return i

        @dispatch.function(name="slow")
        async def slow(i: int) -> int:
            await gate.wait()
            return -i

    served = await serve(register)
    client = served.dispatch.client
    [warm_up] = await client.dispatch([Call("quick", (0,))])
    assert await client.result(warm_up, timeout=10) == 0  # learns the route
    before = len(served.paths)
    ids = await client.dispatch([Call("slow", (1,)), *(Call("quick", (i,)) for i in range(1, 6))])
    # The quick ones are answered while the slow one, sent with them, still runs.
    assert [await client.result(i, timeout=10) for i in ids[1:]] == [1, 2, 3, 4, 5]
    assert served.paths[before:] == [BATCH_PATH]
    gate.set()
    assert await client.result(ids[0], timeout=10) == -1


async def test_an_app_without_the_batch_route_gets_plain_requests(serve: Serve) -> None:
    served = await serve(_fan_out, batch_route=False)
    for n in (30, 30):
        [dispatch_id] = await served.dispatch.client.dispatch([Call("fan_out", (n,))])
        assert await served.dispatch.client.result(dispatch_id, timeout=30) == sum(
            i * i for i in range(n)
        )
    # One batch learns that the route is missing; nothing is lost, and none is sent again.
    assert served.count(BATCH_PATH) == 1
    assert served.count(RUN_PATH) >= 2 * (1 + 30 + 1)  # each child alone


async def test_a_batch_is_signed_and_runs_once(
    serve: Serve, signing_key: Ed25519PrivateKey
) -> None:
    runs: list[int] = []

    def register(dispatch: Dispatch) -> None:
        @dispatch.function(name="effect")
        async def effect(i: int) -> int:
            runs.append(i)
            return i

    served = await serve(register)
    url = served.url + BATCH_PATH
    items = [
        batch_pb2.BatchItem(request=_run_request("effect", i).SerializeToString()) for i in (1, 2)
    ]
    body = batch_pb2.RunBatch(items=items).SerializeToString()
    headers = {"Content-Type": "application/proto"}
    async with aiohttp.ClientSession() as session:

        async def post(signed: dict[str, str]) -> tuple[int, bytes]:
            async with session.post(url, data=body, headers=signed) as resp:
                return resp.status, await resp.read()

        assert (await post(headers))[0] == 401
        other = Ed25519PrivateKey.generate()
        assert (await post({**headers, **sign_request(other, "POST", url, headers, body)}))[
            0
        ] == 403
        signed = {**headers, **sign_request(signing_key, "POST", url, headers, body)}
        status, content = await post(signed)
        assert status == 200
        answers = _answers(content)
        assert sorted(a.index for a in answers) == [0, 1]
        assert all(a.status == 200 for a in answers)
        replayed, content = await post(signed)
        assert replayed == 403 and b"already received" in content
    assert sorted(runs) == [1, 2]


async def test_an_empty_batch_gets_an_empty_stream(
    serve: Serve, signing_key: Ed25519PrivateKey
) -> None:
    served = await serve(_fan_out)
    url = served.url + BATCH_PATH
    headers = {"Content-Type": "application/proto"}
    signed = {**headers, **sign_request(signing_key, "POST", url, headers, b"")}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=b"", headers={**signed, "Content-Length": "0"}) as resp,
    ):
        assert (resp.status, await resp.read()) == (200, b"")


def _run_request(function: str, value: int) -> function_pb2.RunRequest:
    return function_pb2.RunRequest(
        function=function, input=encode_input((value,), {}), dispatch_id=f"id-{value}"
    )


def _answers(content: bytes) -> list[batch_pb2.BatchAnswer]:
    answers = []
    while content:
        length = int.from_bytes(content[:4], "big")
        answers.append(batch_pb2.BatchAnswer.FromString(content[4 : 4 + length]))
        content = content[4 + length :]
    return answers


async def test_run_responses_announce_the_batch_route(serve: Serve) -> None:
    served = await serve(_fan_out)
    async with (
        aiohttp.ClientSession() as session,
        session.post(served.url + RUN_PATH, data=b"") as resp,
    ):
        assert resp.headers.get(BATCH_HEADER) == "1"


@pytest.mark.parametrize("slow_at", [0, 2], ids=["first", "last"])
async def test_an_attempt_that_times_out_in_a_batch_leaves_the_others_answered(
    serve: Serve, slow_at: int
) -> None:
    # The batch's one timer is set for its earliest deadline: the slow call's, whether
    # the batch's first request or one after requests with a longer limit.
    attempts: list[int] = []

    def register(dispatch: Dispatch) -> None:
        @dispatch.function(name="quick")
        async def quick(i: int) -> int:
            await asyncio.sleep(0.6)  # answered after the slow one's attempt gave up
            return i

        @dispatch.function(name="slow")
        async def slow(i: int) -> int:
            attempts.append(i)
            if len(attempts) == 1:
                await asyncio.to_thread(time.sleep, 0.8)
            return -i

    served = await serve(register)
    client = served.dispatch.client
    [warm_up] = await client.dispatch([Call("quick", (0,))])
    assert await client.result(warm_up, timeout=10) == 0
    before = len(served.paths)
    calls = [Call("quick", (i,)) for i in (1, 2)]
    calls.insert(slow_at, Call("slow", (1,), policy=FunctionPolicy(timeout=0.3)))
    ids = await client.dispatch(calls)
    expected = [1, 2]
    expected.insert(slow_at, -1)
    assert [await client.result(i, timeout=10) for i in ids] == expected
    assert served.paths[before] == BATCH_PATH
    # Its first attempt was given up on; the retry got the run's result.
    info = await served.scheduler.progress(ids[slow_at])
    assert info is not None and info.attempts >= 2, info
    assert len(attempts) >= 2


def _chain(dispatch: Dispatch) -> None:
    @dispatch.function(name="inc")
    async def inc(i: int) -> int:
        return i + 1

    @dispatch.function(name="chain")
    async def chain(n: int) -> int:
        x = 0
        for _ in range(n):
            x = await inc(x)
        return x

    @dispatch.function(name="fail")
    async def fail(i: int) -> int:
        raise ValueError(f"no {i}")

    @dispatch.function(name="catch")
    async def catch(n: int) -> int:
        caught = 0
        for i in range(n):
            try:
                await fail(i)
            except ValueError:
                caught += 1
        return caught


async def test_a_chain_of_awaits_takes_one_exchange_a_step(serve: Serve) -> None:
    served = await serve(_chain)
    [dispatch_id] = await served.dispatch.client.dispatch([Call("chain", (20,))])
    assert await served.dispatch.client.result(dispatch_id, timeout=30) == 20
    # The first run is a plain request (it learns the batch route); then each step is
    # one batch: the child's run, and the parent's resume with its result. Two a step
    # without it, and more if a resume was run anyway and had to replay.
    assert served.paths == [RUN_PATH] + [BATCH_PATH] * 20, served.paths
    info = await served.scheduler.progress(dispatch_id)
    assert info is not None and info.attempts == 21, info


async def test_a_resume_goes_alone_when_the_child_fails(serve: Serve) -> None:
    served = await serve(_chain)
    [dispatch_id] = await served.dispatch.client.dispatch([Call("catch", (5,))])
    assert await served.dispatch.client.result(dispatch_id, timeout=30) == 5
    # The endpoint runs a resume only after a child that returned: each failure's
    # resume went alone, with the error as the scheduler recorded it.
    assert served.paths == [RUN_PATH] + [BATCH_PATH, RUN_PATH] * 5, served.paths
