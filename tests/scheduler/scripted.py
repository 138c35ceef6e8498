"""A scripted function endpoint on loopback, and helpers to build protocol messages."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf import any_pb2, wrappers_pb2

from dispatch_aio._signature import verify_request
from dispatch_aio.proto.sdk.v1 import (
    call_pb2,
    error_pb2,
    exit_pb2,
    function_pb2,
    poll_pb2,
    status_pb2,
)
from dispatch_aio.scheduler import RetryPolicy

RUN_PATH = "/dispatch.sdk.v1.FunctionService/Run"
API_KEY = "test-api-key"

Reply = function_pb2.RunResponse | web.StreamResponse
Script = Callable[[function_pb2.RunRequest], Reply | Awaitable[Reply]]


def text(value: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(wrappers_pb2.StringValue(value=value))
    return packed


def unpack_text(value: any_pb2.Any) -> str:
    out = wrappers_pb2.StringValue()
    assert value.Unpack(out), value.type_url
    return out.value


def ok(value: str) -> function_pb2.RunResponse:
    return function_pb2.RunResponse(
        status=status_pb2.STATUS_OK,
        exit=exit_pb2.Exit(result=call_pb2.CallResult(output=text(value))),
    )


def fail(status: int, message: str = "", type_: str = "Boom") -> function_pb2.RunResponse:
    result = call_pb2.CallResult()
    if message:
        result.error.CopyFrom(error_pb2.Error(type=type_, message=message))
    return function_pb2.RunResponse(status=status, exit=exit_pb2.Exit(result=result))  # type: ignore[arg-type]


def poll(
    calls: Iterable[call_pb2.Call] = (),
    *,
    min_results: int = 1,
    max_results: int = 100,
    max_wait: float | None = None,
    state: bytes | any_pb2.Any | None = b"state",
) -> function_pb2.RunResponse:
    p = poll_pb2.Poll(calls=list(calls), min_results=min_results, max_results=max_results)
    if max_wait is not None:
        p.max_wait.FromNanoseconds(int(max_wait * 1e9))
    if isinstance(state, bytes):
        p.coroutine_state = state
    elif state is not None:
        p.typed_coroutine_state.CopyFrom(state)
    return function_pb2.RunResponse(status=status_pb2.STATUS_OK, poll=p)


def call(function: str, value: str = "", correlation_id: int = 0, **kw: Any) -> call_pb2.Call:
    c = call_pb2.Call(function=function, correlation_id=correlation_id, **kw)
    if value:
        c.input.CopyFrom(text(value))
    return c


@dataclass
class Received:
    request: function_pb2.RunRequest
    at: float
    headers: dict[str, str]

    @property
    def results(self) -> list[call_pb2.CallResult]:
        return list(self.request.poll_result.results)

    @property
    def resumed(self) -> bool:
        return self.request.WhichOneof("directive") == "poll_result"


@dataclass
class ScriptedEndpoint:
    """A function endpoint answering RunRequests from per-function scripts.

    Each script gets the RunRequest and returns a RunResponse (or an aiohttp response
    for HTTP-level failures); it may be async. Every request is recorded, and its
    signature checked against `public_key` when set.
    """

    public_key: Any = None
    scripts: dict[str, Script] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    url: str = ""
    signature_failures: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, function: str, script: Script) -> None:
        self.scripts[function] = script

    def requests_for(self, function: str) -> list[Received]:
        return [r for r in self.received if r.request.function == function]

    def for_id(self, dispatch_id: str) -> list[Received]:
        return [r for r in self.received if r.request.dispatch_id == dispatch_id]

    async def wait_for(self, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        if self.public_key is not None:
            try:
                verify_request(self.public_key, request.method, str(request.url), headers, body)
            except Exception as exc:
                self.signature_failures.append(repr(exc))
                return web.Response(status=403)
        run = function_pb2.RunRequest.FromString(body)
        self.received.append(Received(run, time.monotonic(), headers))
        self._changed.set()
        script = self.scripts.get(run.function)
        if script is None:
            return web.json_response(
                {"code": "not_found", "message": f"function {run.function!r} does not exist"},
                status=404,
            )
        reply = script(run)
        if inspect.isawaitable(reply):
            reply = await reply
        if isinstance(reply, web.StreamResponse):
            return reply
        return web.Response(body=reply.SerializeToString(), content_type="application/proto")


FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)


def resumed(request: function_pb2.RunRequest) -> bool:
    return request.WhichOneof("directive") == "poll_result"


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until `predicate()` holds, checking every few milliseconds."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - state of another component, no event
            await asyncio.sleep(0.005)
