"""The function endpoint as an ASGI application (uvicorn, Starlette, FastAPI ...).

`ASGIEndpoint` answers ``POST .../dispatch.sdk.v1.FunctionService/Run`` with the same
checks, signature verification and error mapping as the aiohttp endpoint (it calls
the same `Endpoint.respond`), ``POST .../dispatch_aio.v1.FunctionService/RunBatch``
(several Run requests of dispatch_aio's scheduler in one exchange, answered as their
runs end) as the aiohttp endpoint does, and 404 for any other path. It handles the
``lifespan`` protocol when it is the server's application; mounted in a framework,
which does not pass lifespan events to mounted applications, use the framework's own
lifespan hook (``FastAPI(lifespan=dispatch.lifespan)``)::

    from fastapi import FastAPI
    from dispatch_aio.asgi import PATHS

    app = FastAPI(lifespan=dispatch.lifespan)
    endpoint = dispatch.asgi()
    for path in PATHS:  # Run, and RunBatch
        app.add_route(path, endpoint, methods=["POST"])

Or ``app.mount("/dispatch", dispatch.asgi())``, with an endpoint URL that ends with
``/dispatch``. A framework that routes only `RUN_PATH` here answers batches 404: the
scheduler then sends that endpoint plain Run requests only.

The URL a signature covers is the one the client addressed: the scheme, the ``Host``
header and the raw request path, whatever prefix a framework has stripped.
"""

from __future__ import annotations

__all__ = ["BATCH_PATH", "PATHS", "RUN_PATH", "ASGIEndpoint"]

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from multidict import CIMultiDict

from ._batch import BATCH_PATH, BATCH_TYPE
from ._endpoint import RUN_PATH, Endpoint, Incoming, Reply

PATHS = (RUN_PATH, BATCH_PATH)
"""The paths the endpoint serves, each with POST."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ASGIEndpoint:
    """An ASGI application serving one `Dispatch` object's functions.

    Build it with `dispatch_aio.Dispatch.asgi`.

    Args:
        endpoint: The endpoint whose checks and runner answer requests.
        lifespan: Starts and stops the `Dispatch` object (its ``lifespan`` method).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        lifespan: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        self._endpoint = endpoint
        self._lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._serve_lifespan(receive, send)
        elif kind == "http":
            answer = await self._http(scope, receive)
            if isinstance(answer, Reply):
                await _send_reply(send, answer)
            else:
                await _send_stream(send, answer)
        # Other scopes (websocket) are not served: returning closes them.

    async def _http(
        self, scope: Scope, receive: Receive
    ) -> Reply | AsyncIterator[tuple[bytes, bool]]:
        raw_path = scope.get("raw_path") or (scope.get("root_path", "") + scope["path"]).encode()
        path = bytes(raw_path).decode("latin-1")
        route = next((p for p in PATHS if path.endswith(p)), None)
        if route is None:
            return _json(404, "not_found", f"no route for {path[:200]}: POST {RUN_PATH}")
        if scope["method"] != "POST":
            return _json(405, "unimplemented", f"{route} is called with POST")
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in scope["headers"]:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        host = headers.get("Host")
        if host is None:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server else "localhost"
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"{scope.get('scheme', 'http')}://{host}{path}" + (f"?{query}" if query else "")
        client = scope.get("client")
        incoming = Incoming(
            "POST", url, headers, client[0] if client else None, _BodyReader(receive).read
        )
        if route == BATCH_PATH:
            return await self._endpoint.respond_batch(incoming)
        return await self._endpoint.respond(incoming)

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self._lifespan())
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()  # lifespan.shutdown
        try:
            await stack.aclose()
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


class _BodyReader:
    """Reads the request body from ASGI ``http.request`` messages."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffer = bytearray()
        self._ended = False

    async def read(self, length: int) -> bytes:
        while len(self._buffer) < length and not self._ended:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._ended = True
                break
            self._buffer += message.get("body", b"")
            self._ended = not message.get("more_body", False)
        if len(self._buffer) < length:
            raise asyncio.IncompleteReadError(bytes(self._buffer), length)
        data = bytes(self._buffer[:length])
        del self._buffer[:length]
        return data


def _json(status: int, code: str, message: str) -> Reply:
    body = json.dumps({"code": code, "message": message}).encode()
    return Reply(status, body, "application/json")


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in reply.headers),
    ]
    if reply.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _send_stream(send: Send, chunks: AsyncIterator[tuple[bytes, bool]]) -> None:
    """Send a batch's answers as they come (no length: the server chunks them)."""
    headers = [(b"content-type", BATCH_TYPE.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    connected = True
    async for data, more in chunks:
        if connected:
            try:
                await send({"type": "http.response.body", "body": data, "more_body": more})
            except OSError:
                connected = False  # the runs go on (see Endpoint.respond_batch)
