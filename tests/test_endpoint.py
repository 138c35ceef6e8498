"""The Run endpoint over real HTTP: signatures, request checks, and fuzzed bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from asgi_server import serve_asgi
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from endpoint_driver import RUN_PATH, Driver, Outcome, Reply, serve_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch_aio import Dispatch, EndpointServer, Status
from dispatch_aio._codec import encode_input
from dispatch_aio._endpoint import is_loopback
from dispatch_aio._signature import public_key_to_base64, sign_request
from dispatch_aio.proto.sdk.v1 import function_pb2, poll_pb2

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
SMALL_LIMIT = 4096


def build_dispatch(**kwargs: Any) -> Dispatch:
    kwargs.setdefault("env", {})
    kwargs.setdefault("endpoint_addr", "127.0.0.1:0")
    kwargs.setdefault("api_url", "http://127.0.0.1:9")  # a separate scheduler: serve over HTTP
    dispatch = Dispatch(**kwargs)

    @dispatch.function(name="echo")
    async def echo(x: Any) -> Any:
        return x

    @dispatch.function(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    return dispatch


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def served(dispatch: Dispatch, how: str) -> AsyncIterator[EndpointServer]:
    """Serve with `Dispatch.start` (aiohttp), or as ASGI under uvicorn."""
    if how == "aiohttp":
        async with await dispatch.start() as server:
            yield server
    else:
        async with serve_asgi(dispatch.asgi()) as server:
            yield server  # type: ignore[misc]  # the same url and port


@pytest.fixture(params=["aiohttp", "asgi"])
async def signed(request: pytest.FixtureRequest) -> AsyncIterator[EndpointServer]:
    """An endpoint that verifies signatures made with KEY."""
    dispatch = build_dispatch(verification_key=public_key_to_base64(KEY.public_key()))
    async with served(dispatch, request.param) as server:
        yield server


@pytest.fixture(params=["aiohttp", "asgi"])
async def unsigned(request: pytest.FixtureRequest) -> AsyncIterator[EndpointServer]:
    """An endpoint without a verification key and a small body limit."""
    dispatch = build_dispatch(max_body_size=SMALL_LIMIT, body_timeout=0.5)
    async with served(dispatch, request.param) as server:
        yield server


def run_request(function: str = "echo", *args: Any) -> bytes:
    args = args or ("hi",)
    return function_pb2.RunRequest(
        function=function, input=encode_input(args, {}), dispatch_id="d1"
    ).SerializeToString()


def connect_error(reply: Reply) -> tuple[int, str]:
    assert reply.content_type == "application/json", reply
    body = json.loads(reply.body)
    assert set(body) == {"code", "message"} and body["message"], body
    return reply.status, body["code"]


# -- signatures ---------------------------------------------------------------------------


async def test_signed_requests_are_accepted(
    signed: EndpointServer, session: aiohttp.ClientSession
) -> None:
    driver = Driver(session, signed.url, key=KEY)
    assert await driver.call("add", 2, 3) == Outcome(Status.OK, 5)


async def test_signature_negatives_are_rejected(
    signed: EndpointServer, session: aiohttp.ClientSession
) -> None:
    driver = Driver(session, signed.url, key=KEY)
    body = run_request()
    good = driver.signed_headers(body)

    # Unsigned: 401.
    reply = await driver.post(body, {"Content-Type": "application/proto"})
    assert connect_error(reply) == (401, "unauthenticated")
    assert b"Signature-Input" in reply.body

    # A signature header missing: 401.
    for missing in ("Signature", "Signature-Input", "Content-Digest"):
        headers = {k: v for k, v in good.items() if k != missing}
        assert connect_error(await driver.post(body, headers)) == (401, "unauthenticated")

    # Another body than the signed one: 403.
    assert connect_error(await driver.post(run_request("echo", "changed"), good)) == (
        403,
        "permission_denied",
    )

    # Signed with another key: 403.
    other = Driver(session, signed.url, key=OTHER_KEY)
    assert connect_error(await other.post(body)) == (403, "permission_denied")

    # Stale: created ten minutes ago.
    headers = {"Content-Type": "application/proto"}
    headers |= sign_request(KEY, "POST", driver.url, headers, body, created=int(time.time()) - 600)
    reply = await driver.post(body, headers)
    assert connect_error(reply) == (403, "permission_denied")
    assert b"too old" in reply.body

    # Signed for another path (a replay to another route): 403.
    headers = {"Content-Type": "application/proto"}
    headers |= sign_request(KEY, "POST", signed.url + "/other" + RUN_PATH, headers, body)
    assert connect_error(await driver.post(body, headers)) == (403, "permission_denied")

    # The good signature still works.
    assert Status((await driver.post(body, good)).run_response().status) is Status.OK


async def test_signature_covers_the_host_the_client_addressed(
    signed: EndpointServer, session: aiohttp.ClientSession
) -> None:
    # Behind a proxy, the scheduler signs the public URL and the proxy keeps the Host.
    body = run_request()
    public_url = "https://functions.example.com" + RUN_PATH
    headers = {"Content-Type": "application/proto"}
    headers |= sign_request(KEY, "POST", public_url, headers, body)
    driver = Driver(session, signed.url)
    reply = await driver.post(body, headers | {"Host": "functions.example.com"})
    assert Status(reply.run_response().status) is Status.OK
    # A proxy that rewrites the Host breaks the signature.
    reply = await driver.post(body, headers)
    assert connect_error(reply) == (403, "permission_denied")


# -- request checks -------------------------------------------------------------------------


async def test_content_types(unsigned: EndpointServer, session: aiohttp.ClientSession) -> None:
    driver = Driver(session, unsigned.url)
    body = run_request()
    for content_type in ("application/proto", "application/octet-stream", "Application/Proto"):
        reply = await driver.post(body, {"Content-Type": content_type})
        assert Status(reply.run_response().status) is Status.OK, content_type
    for content_type in ("application/json", "text/plain", "application/grpc", ""):
        reply = await driver.post(body, {"Content-Type": content_type})
        assert connect_error(reply) == (415, "invalid_argument"), content_type
    reply = await driver.post(
        body, {"Content-Type": "application/proto", "Content-Encoding": "gzip"}
    )
    assert connect_error(reply) == (415, "invalid_argument")
    assert b"uncompressed" in reply.body


async def test_missing_content_type_is_accepted(unsigned: EndpointServer) -> None:
    # aiohttp's client always sends one; speak HTTP directly.
    body = run_request()
    status, _, payload = await raw_request(
        unsigned,
        b"POST " + RUN_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body,
    )
    assert status == 200
    assert Status(function_pb2.RunResponse.FromString(payload).status) is Status.OK


async def test_bad_requests_get_connect_errors(
    unsigned: EndpointServer, session: aiohttp.ClientSession
) -> None:
    driver = Driver(session, unsigned.url)
    reply = await driver.post(run_request("missing"))
    assert connect_error(reply) == (404, "not_found")
    assert b"'missing' is not registered" in reply.body and b"add, echo" in reply.body

    reply = await driver.post(run_request(""))
    assert connect_error(reply) == (400, "invalid_argument")
    assert connect_error(await driver.post(b"\xff\xff\xff")) == (400, "invalid_argument")
    # An empty body is read as such (an empty RunRequest names no function).
    reply = await driver.post(b"")
    assert connect_error(reply) == (400, "invalid_argument")
    assert b"function" in reply.body and b"ended after" not in reply.body, reply.body

    async with session.get(driver.url) as resp:
        assert resp.status == 405


async def test_run_failures_after_routing_are_run_responses(
    unsigned: EndpointServer, session: aiohttp.ClientSession
) -> None:
    driver = Driver(session, unsigned.url)
    # Wrong arguments for the function: a RunResponse with a status, not an HTTP error.
    resp = (await driver.post(run_request("add", 1))).run_response()
    assert Status(resp.status) is Status.INVALID_ARGUMENT
    assert "TypeError" in resp.exit.result.error.type
    # A resume with a state that is not ours.
    req = function_pb2.RunRequest(
        function="echo", poll_result=poll_pb2.PollResult(coroutine_state=b"legacy")
    )
    resp = (await driver.post(req.SerializeToString())).run_response()
    assert Status(resp.status) is Status.INCOMPATIBLE_STATE


async def test_body_limit(unsigned: EndpointServer, session: aiohttp.ClientSession) -> None:
    driver = Driver(session, unsigned.url)
    big = run_request("echo", "x" * SMALL_LIMIT)
    assert len(big) > SMALL_LIMIT
    reply = await driver.post(big, {"Content-Type": "application/proto"})
    assert connect_error(reply) == (413, "invalid_argument")
    fits = run_request("echo", "x" * (SMALL_LIMIT - 100))
    reply = await driver.post(fits, {"Content-Type": "application/proto"})
    assert Status(reply.run_response().status) is Status.OK


@pytest.fixture(params=["aiohttp", "asgi"])
async def signed_small(request: pytest.FixtureRequest) -> AsyncIterator[EndpointServer]:
    """A verifying endpoint: unchecked bodies up to SMALL_LIMIT, signed ones up to 10x."""
    dispatch = build_dispatch(
        verification_key=public_key_to_base64(KEY.public_key()),
        max_body_size=SMALL_LIMIT,
        max_signed_body_size=10 * SMALL_LIMIT,
    )
    async with served(dispatch, request.param) as server:
        yield server


async def test_a_signed_request_may_be_larger_than_the_body_limit(
    signed_small: EndpointServer, session: aiohttp.ClientSession
) -> None:
    driver = Driver(session, signed_small.url, key=KEY)
    large = run_request("echo", "x" * (5 * SMALL_LIMIT))
    reply = await driver.post(large)
    assert Status(reply.run_response().status) is Status.OK

    # Over the signed limit: refused before the body is read, naming that limit.
    huge = run_request("echo", "x" * (11 * SMALL_LIMIT))
    reply = await driver.post(huge)
    assert connect_error(reply) == (413, "invalid_argument")
    assert f"limit of {10 * SMALL_LIMIT} bytes".encode() in reply.body
    assert b"max_signed_body_size" in reply.body

    # Signed by another key, or not signed: the small limit holds.
    other = Driver(session, signed_small.url, key=OTHER_KEY)
    reply = await other.post(large)
    assert connect_error(reply) == (413, "invalid_argument")
    assert b"does not check out" in reply.body
    reply = await driver.post(large, {"Content-Type": "application/proto"})
    assert connect_error(reply) == (413, "invalid_argument")

    # A valid signature over a body that was then swapped: refused once read.
    headers = driver.signed_headers(large)
    swapped = run_request("echo", "y" * (5 * SMALL_LIMIT))
    assert len(swapped) == len(large)
    reply = await driver.post(swapped, headers)
    assert connect_error(reply) == (403, "permission_denied")


async def test_without_a_key_a_large_body_is_refused_saying_what_would_allow_it(
    unsigned: EndpointServer, session: aiohttp.ClientSession
) -> None:
    driver = Driver(session, unsigned.url)
    reply = await driver.post(run_request("echo", "x" * (2 * SMALL_LIMIT)))
    assert connect_error(reply) == (413, "invalid_argument")
    assert b"whose signature is not checked" in reply.body
    assert b"verification key" in reply.body


async def test_default_body_limit_is_16_mb() -> None:
    async with await build_dispatch(body_timeout=0.3).start() as server:
        head = b"POST " + RUN_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        head += b"Content-Type: application/proto\r\n"
        # Announce the length without sending the body: over the limit is refused at once;
        # at the limit the endpoint waits for the body (until the body timeout here).
        status, _, _ = await raw_request(server, head + b"Content-Length: 16000001\r\n\r\n")
        assert status == 413
        status, _, _ = await raw_request(server, head + b"Content-Length: 16000000\r\n\r\n")
        assert status == 408


async def test_chunked_bodies_are_refused(unsigned: EndpointServer) -> None:
    body = run_request()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    status, _, payload = await raw_request(
        unsigned,
        b"POST " + RUN_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/proto\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
    )
    assert status == 411
    assert json.loads(payload)["code"] == "invalid_argument"


async def test_lying_content_length(unsigned: EndpointServer) -> None:
    body = run_request()
    head = b"POST " + RUN_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
    head += b"Content-Type: application/proto\r\n"
    # Longer than the body, then the client stops sending: the server closes the
    # connection (no one is left to read an answer).
    status, _, payload = await raw_request(
        unsigned,
        head + f"Content-Length: {len(body) + 50}\r\n\r\n".encode() + body,
        half_close=True,
    )
    assert status == 0 or (status == 400 and b"ended after" in payload), (status, payload)
    # Longer than the body, and the client keeps the connection open: 408 after the
    # body timeout rather than a hang.
    began = time.monotonic()
    status, _, payload = await raw_request(
        unsigned, head + f"Content-Length: {len(body) + 50}\r\n\r\n".encode() + body
    )
    assert status == 408 and json.loads(payload)["code"] == "deadline_exceeded"
    assert time.monotonic() - began < 5
    # Shorter than the body: the rest is a malformed next request, which aiohttp's HTTP
    # parser answers with a plain 400.
    status, _, payload = await raw_request(
        unsigned, head + f"Content-Length: {len(body) - 5}\r\n\r\n".encode() + body
    )
    assert status == 400, (status, payload)


async def raw_request(
    server: EndpointServer, data: bytes, *, half_close: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the status, headers and body of the first response.

    The status is 0 if the server closed the connection without answering.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
        await writer.wait_closed()
    if not status_line:
        return 0, {}, b""
    return int(status_line.split()[1]), headers, payload


# -- fuzzing ----------------------------------------------------------------------------------


def check_answer(reply: Reply) -> None:
    """Never a 500: a Connect JSON error, or a RunResponse with a status."""
    if reply.status == 200:
        resp = reply.run_response()
        assert Status(resp.status) is not Status.UNSPECIFIED
        assert resp.WhichOneof("directive") in ("exit", "poll")
    else:
        assert reply.status in (400, 404, 413), reply
        connect_error(reply)


VALID = run_request("add", 1, 2)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_fuzzed_bodies_never_crash_the_endpoint(
    unsigned: EndpointServer, session: aiohttp.ClientSession, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(["random", "mutated", "truncated", "fields"]))
    if kind == "random":
        body = data.draw(st.binary(max_size=200))
    elif kind == "mutated":
        mutated = bytearray(VALID)
        for _ in range(data.draw(st.integers(1, 8))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        body = bytes(mutated)
    elif kind == "truncated":
        body = VALID[: data.draw(st.integers(0, len(VALID)))]
    else:
        req = function_pb2.RunRequest(
            function=data.draw(st.sampled_from(["add", "echo", "nope", "", "a-b"])),
            dispatch_id=data.draw(st.text(max_size=5)),
        )
        if data.draw(st.booleans()):
            req.input.type_url = data.draw(st.text(max_size=60))
            req.input.value = data.draw(st.binary(max_size=60))
        else:
            req.poll_result.typed_coroutine_state.type_url = data.draw(st.text(max_size=60))
            req.poll_result.typed_coroutine_state.value = data.draw(st.binary(max_size=100))
        body = req.SerializeToString()
    driver = Driver(session, unsigned.url)
    async with asyncio.timeout(10):  # never a hang
        check_answer(await driver.post(body, {"Content-Type": "application/proto"}))


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "example.com", "my-host"):
        assert not is_loopback(host), host


async def test_a_bad_key_found_at_the_first_request_is_a_500(
    session: aiohttp.ClientSession,
) -> None:
    # Mounted without the cleanup context, the key is only read at the first request.
    app = web.Application()
    app.add_routes(build_dispatch(verification_key="not-a-key").routes())
    runner, url = await serve_app(app)
    try:
        reply = await Driver(session, url).post(run_request())
    finally:
        await runner.cleanup()
    assert connect_error(reply) == (500, "internal")
    assert b"DISPATCH_VERIFICATION_KEY" in reply.body
