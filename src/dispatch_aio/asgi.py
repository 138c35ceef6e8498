"""The function endpoint as an ASGI application (uvicorn, Starlette, FastAPI ...).

`ASGIEndpoint` answers ``POST .../dispatch.sdk.v1.FunctionService/Run`` with the same
checks, signature verification and error mapping as the aiohttp endpoint (it calls
the same `Endpoint.respond`), and 404 for any other path. It handles the ``lifespan``
protocol when it is the server's application; mounted in a framework, which does not
pass lifespan events to mounted applications, use the framework's own lifespan hook
(``FastAPI(lifespan=dispatch.lifespan)``)::

    from fastapi import FastAPI
    from dispatch_aio.asgi import RUN_PATH

    app = FastAPI(lifespan=dispatch.lifespan)
    app.add_route(RUN_PATH, dispatch.asgi(), methods=["POST"])

The URL a signature covers is the one the client addressed: the scheme, the ``Host``
header and the raw request path, whatever prefix a framework has stripped.
"""

from __future__ import annotations

__all__ = ["RUN_PATH", "ASGIEndpoint"]

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from multidict import CIMultiDict

from ._endpoint import RUN_PATH, Endpoint, Incoming, Reply

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
            reply = await self._http(scope, receive)
            await _send_reply(send, reply)
        # Other scopes (websocket) are not served: returning closes them.

    async def _http(self, scope: Scope, receive: Receive) -> Reply:
        raw_path = scope.get("raw_path") or (scope.get("root_path", "") + scope["path"]).encode()
        path = bytes(raw_path).decode("latin-1")
        if not path.endswith(RUN_PATH):
            return _json(404, "not_found", f"no route for {path[:200]}: POST {RUN_PATH}")
        if scope["method"] != "POST":
            return _json(405, "unimplemented", f"{RUN_PATH} is called with POST")
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
    ]
    if reply.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
