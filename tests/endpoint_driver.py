"""Test helpers: a scheduler driver that runs calls over HTTP, and a fake Dispatch API.

The driver plays the scheduler against a real endpoint on loopback: it sends (signed)
RunRequests, runs the child calls of each Poll by calling the endpoint again, delivers
their results with the echoed state, waits for ``max_wait`` and follows tail calls.

The fake API is a stand-in for the external DispatchService: it records the requests it
gets and answers with dispatch ids (or whatever a test asks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import any_pb2

from dispatch_aio import _codec
from dispatch_aio._signature import sign_request
from dispatch_aio._status import Status
from dispatch_aio.proto.sdk.v1 import call_pb2, dispatch_pb2, function_pb2, poll_pb2

RUN_PATH = "/dispatch.sdk.v1.FunctionService/Run"
DISPATCH_PATH = "/dispatch.sdk.v1.DispatchService/Dispatch"


@dataclasses.dataclass
class Outcome:
    status: Status
    output: Any = None
    error: BaseException | None = None


@dataclasses.dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def run_response(self) -> function_pb2.RunResponse:
        assert self.status == 200, (self.status, self.body)
        assert self.content_type == "application/proto", self.content_type
        return function_pb2.RunResponse.FromString(self.body)


class Driver:
    """Drives the endpoint at `base_url` like a scheduler."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + RUN_PATH
        self.key = key
        self.requests: list[function_pb2.RunRequest] = []
        self.responses: list[function_pb2.RunResponse] = []
        self.waits: list[float] = []  # max_wait of each Poll that had one
        self.next_id = 0
        # Per poller: its running children by correlation id, and undelivered results.
        self.pending: dict[
            str, tuple[dict[int, asyncio.Future[Any]], list[call_pb2.CallResult]]
        ] = {}

    def signed_headers(self, body: bytes, url: str | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/proto"}
        if self.key is not None:
            headers.update(sign_request(self.key, "POST", url or self.url, headers, body))
        return headers

    async def post(
        self, body: bytes, headers: dict[str, str] | None = None, url: str | None = None
    ) -> Reply:
        async with self.session.post(
            url or self.url,
            data=body,
            headers=self.signed_headers(body) if headers is None else headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            return Reply(resp.status, resp.content_type, await resp.read())

    async def send(self, req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        self.requests.append(req)
        resp = (await self.post(req.SerializeToString())).run_response()
        self.responses.append(resp)
        return resp

    async def call(self, function: str, *args: Any, **kwargs: Any) -> Outcome:
        status, res = await self.execute(function, _codec.encode_input(args, kwargs))
        output = _codec.decode_value(res.output) if res.HasField("output") else None
        error = _codec.decode_error(res.error) if res.HasField("error") else None
        return Outcome(status, output, error)

    async def execute(
        self, function: str, input: any_pb2.Any
    ) -> tuple[Status, call_pb2.CallResult]:
        self.next_id += 1
        req = function_pb2.RunRequest(function=function, input=input, dispatch_id=str(self.next_id))
        while True:
            resp = await self.send(req)
            if resp.WhichOneof("directive") == "exit":
                if resp.exit.HasField("tail_call"):
                    tail = resp.exit.tail_call
                    req = function_pb2.RunRequest(
                        function=tail.function, input=tail.input, dispatch_id=req.dispatch_id
                    )
                    continue
                return Status(resp.status), resp.exit.result
            assert resp.WhichOneof("directive") == "poll", resp
            req = await self._poll(req, resp.poll)

    async def _poll(
        self, req: function_pb2.RunRequest, poll: poll_pb2.Poll
    ) -> function_pb2.RunRequest:
        assert 1 <= poll.min_results <= poll.max_results <= 1000, poll
        tasks, queue = self.pending.setdefault(req.dispatch_id, ({}, []))
        for call in poll.calls:
            tasks[call.correlation_id] = asyncio.ensure_future(
                self.execute(call.function, call.input)
            )
        deadline = None
        if poll.HasField("max_wait"):
            wait = poll.max_wait.ToTimedelta().total_seconds()
            assert wait >= 1, poll
            self.waits.append(wait)
            deadline = time.monotonic() + wait
        while True:
            for cid, task in list(tasks.items()):
                if task.done():
                    del tasks[cid]
                    status, res = task.result()
                    out = call_pb2.CallResult()
                    out.CopyFrom(res)
                    out.correlation_id = cid
                    if status is not Status.OK and not res.HasField("error"):
                        out.error.type = "status"
                        out.error.message = status.name
                    queue.append(out)
            if len(queue) >= poll.min_results:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not tasks:
                assert deadline is not None, "the function waits for results that never come"
                await asyncio.sleep(deadline - time.monotonic())
                continue
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait(tasks.values(), timeout=timeout, return_when="FIRST_COMPLETED")
        delivered, queue[:] = queue[: poll.max_results], queue[poll.max_results :]
        result = poll_pb2.PollResult(
            typed_coroutine_state=poll.typed_coroutine_state, results=delivered
        )
        return function_pb2.RunRequest(
            function=req.function, poll_result=result, dispatch_id=req.dispatch_id
        )


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on 127.0.0.1, a free port; return the runner and the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site.port}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class Received:
    headers: dict[str, str]
    request: dispatch_pb2.DispatchRequest


class FakeAPI:
    """A fake DispatchService on loopback that records requests and returns ids."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.respond: Handler | None = None  # overrides the default answer
        self.url = ""
        self._counter = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(dict(request.headers), dispatch_pb2.DispatchRequest.FromString(body))
        )
        if self.respond is not None:
            return await self.respond(request)
        ids = []
        for _ in self.received[-1].request.calls:
            self._counter += 1
            ids.append(f"id-{self._counter}")
        reply = dispatch_pb2.DispatchResponse(dispatch_ids=ids)
        return web.Response(body=reply.SerializeToString(), content_type="application/proto")

    def calls(self) -> list[call_pb2.Call]:
        return [call for r in self.received for call in r.request.calls]


async def fake_api() -> AsyncIterator[FakeAPI]:
    api = FakeAPI()
    app = web.Application()
    app.router.add_post(DISPATCH_PATH, api.handle)
    runner, api.url = await serve_app(app)
    try:
        yield api
    finally:
        await runner.cleanup()
