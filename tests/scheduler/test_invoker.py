"""Signed Run requests, outcome classification and adaptive concurrency per endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio._status import Status
from dispatch_aio.proto.sdk.v1 import function_pb2, status_pb2
from dispatch_aio.scheduler._invoker import Invoker, _Window

from .scripted import ScriptedEndpoint, fail, ok, text


def request(function: str = "f", value: str = "x") -> function_pb2.RunRequest:
    return function_pb2.RunRequest(function=function, input=text(value), dispatch_id="d1")


@pytest.fixture
async def invoker(signing_key: Ed25519PrivateKey) -> AsyncIterator[Invoker]:
    inv = Invoker(signing_key, max_concurrency=4, initial_concurrency=1)
    await inv.open()
    yield inv
    await inv.close()


async def test_requests_are_signed_and_answers_decoded(
    endpoint: ScriptedEndpoint, invoker: Invoker
) -> None:
    endpoint.on("f", lambda req: ok("hello"))
    outcome = await invoker.run(endpoint.url, request(), 5)
    assert outcome.status is Status.OK
    assert outcome.response is not None
    assert outcome.response.exit.result.output == text("hello")
    [received] = endpoint.received
    assert received.request == request()
    assert received.headers["Content-Digest"].startswith("sha-512=:")
    assert 'keyid="default"' in received.headers["Signature-Input"]
    # The endpoint fixture verified the signature with the scheduler's public key.


async def test_endpoint_with_a_path_prefix(
    signing_key: Ed25519PrivateKey, invoker: Invoker
) -> None:
    ep = ScriptedEndpoint(public_key=signing_key.public_key())
    ep.on("f", lambda req: ok("prefixed"))
    app = web.Application()
    app.router.add_post("/api/dispatch.sdk.v1.FunctionService/Run", ep.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        outcome = await invoker.run(f"http://127.0.0.1:{port}/api/", request(), 5)
        assert outcome.status is Status.OK
        assert not ep.signature_failures
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("reply", "status", "words"),
    [
        (web.Response(status=503, text="overloaded"), Status.TEMPORARY_ERROR, "HTTP 503"),
        (web.Response(status=501), Status.PERMANENT_ERROR, "HTTP 501"),
        (web.Response(status=429), Status.THROTTLED, "HTTP 429"),
        (web.Response(text="ok"), Status.INVALID_RESPONSE, "text/plain"),
        (
            web.Response(body=b"\xff\xff\xff", content_type="application/proto"),
            Status.INVALID_RESPONSE,
            "cannot be decoded",
        ),
        (
            web.json_response({"code": "not_found", "message": "no f here"}, status=404),
            Status.NOT_FOUND,
            "HTTP 404: no f here",
        ),
    ],
)
async def test_http_answers_are_classified(
    endpoint: ScriptedEndpoint,
    invoker: Invoker,
    reply: web.Response,
    status: Status,
    words: str,
) -> None:
    endpoint.on("f", lambda req: reply)
    outcome = await invoker.run(endpoint.url, request(), 5)
    assert outcome.response is None
    assert outcome.status is status
    assert words in outcome.error


async def test_run_response_status_is_reported(
    endpoint: ScriptedEndpoint, invoker: Invoker
) -> None:
    endpoint.on("f", lambda req: fail(status_pb2.STATUS_TCP_ERROR, "downstream"))
    outcome = await invoker.run(endpoint.url, request(), 5)
    assert outcome.status is Status.TCP_ERROR
    assert outcome.response is not None


async def test_connection_refused_is_a_tcp_error(invoker: Invoker, unused_tcp_port: int) -> None:
    outcome = await invoker.run(f"http://127.0.0.1:{unused_tcp_port}", request(), 5)
    assert outcome.status is Status.TCP_ERROR
    assert outcome.status.temporary
    assert invoker.concurrency(f"http://127.0.0.1:{unused_tcp_port}") == 1


async def test_slow_endpoint_times_out(endpoint: ScriptedEndpoint, invoker: Invoker) -> None:
    async def slow(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        await asyncio.sleep(2)
        return ok("late")

    endpoint.on("f", slow)
    outcome = await invoker.run(endpoint.url, request(), 0.1)
    assert outcome.status is Status.TIMEOUT
    assert "0.1" in outcome.error


async def test_window_grows_on_success_up_to_the_ceiling(
    endpoint: ScriptedEndpoint, invoker: Invoker
) -> None:
    inflight = peak = 0

    async def leaf(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.01)
        inflight -= 1
        return ok("x")

    endpoint.on("f", leaf)
    assert invoker.concurrency(endpoint.url) == 1
    await asyncio.gather(*(invoker.run(endpoint.url, request(), 5) for _ in range(2)))
    assert peak == 1, "the initial window is one request"
    assert invoker.concurrency(endpoint.url) == 3, "slow start: one more slot per success"
    await invoker.run(endpoint.url, request(), 5)
    assert invoker.concurrency(endpoint.url) == 4
    await asyncio.gather(*(invoker.run(endpoint.url, request(), 5) for _ in range(20)))
    assert peak == 4, "the ceiling bounds the requests in flight"
    assert invoker.concurrency(endpoint.url) == 4


async def test_throttling_halves_the_window_once_per_window(
    endpoint: ScriptedEndpoint, invoker: Invoker
) -> None:
    endpoint.on("ok", lambda req: ok("x"))

    async def throttled(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        await asyncio.sleep(0.01)
        return fail(status_pb2.STATUS_THROTTLED, "slow down")

    endpoint.on("busy", throttled)
    for _ in range(3):
        await invoker.run(endpoint.url, request("ok"), 5)
    assert invoker.concurrency(endpoint.url) == 4
    # Four throttled answers to requests sent in the same window: one decrease.
    outcomes = await asyncio.gather(
        *(invoker.run(endpoint.url, request("busy"), 5) for _ in range(4))
    )
    assert {o.status for o in outcomes} == {Status.THROTTLED}
    assert invoker.concurrency(endpoint.url) == 2
    # After slow start ended, growth is additive: about one slot per window.
    for _ in range(2):
        await invoker.run(endpoint.url, request("ok"), 5)
    assert 2 < invoker.concurrency(endpoint.url) < 3.5
    # A timeout also shrinks it.
    endpoint.on("hang", lambda req: asyncio.sleep(1, ok("late")))
    await invoker.run(endpoint.url, request("hang"), 0.05)
    assert invoker.concurrency(endpoint.url) < 2


async def test_windows_are_per_endpoint(
    endpoint: ScriptedEndpoint, invoker: Invoker, unused_tcp_port: int
) -> None:
    endpoint.on("f", lambda req: ok("x"))
    for _ in range(3):
        await invoker.run(endpoint.url, request(), 5)
    await invoker.run(f"http://127.0.0.1:{unused_tcp_port}", request(), 5)
    assert invoker.concurrency(endpoint.url) == 4
    assert invoker.concurrency(f"http://127.0.0.1:{unused_tcp_port}") == 1


def test_ceiling_must_be_positive(signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="max_concurrency must be at least 1"):
        Invoker(signing_key, max_concurrency=0)


async def test_a_cancelled_waiter_already_dropped_by_a_release_is_not_an_error() -> None:
    # Seen when the app was killed: a release popped the cancelled waiter of a task that
    # had not yet run its cleanup, which then failed with "not in deque".
    window = _Window(initial=1, ceiling=1)
    epoch = await window.acquire()
    waiting = asyncio.ensure_future(window.acquire())
    await asyncio.sleep(0)
    waiting.cancel()  # its waiter future is now cancelled; the task has not resumed yet
    window.release(epoch, success=False, overload=False)  # pops the cancelled waiter
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert window.inflight == 0 and not window.waiters
    assert await window.acquire() == window.epoch  # the slot is free again


async def test_an_outage_is_one_warning_and_its_end_another(
    signing_key: Ed25519PrivateKey, unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    inv = Invoker(signing_key, unreachable_warning=0.3)
    await inv.open()
    try:
        for _ in range(8):  # 0.8 s of refused connections
            assert (await inv.run(url, request(), 5)).status is Status.TCP_ERROR
            await asyncio.sleep(0.1)
        down = [r for r in caplog.records if "unreachable for" in r.getMessage()]
        assert len(down) == 1 and down[0].levelname == "WARNING"
        assert url in down[0].getMessage() and "is the app running" in down[0].getMessage()

        async def answer(_: web.Request) -> web.Response:
            return web.Response()  # not even a RunResponse: an answer all the same

        app = web.Application()
        app.router.add_post("/dispatch.sdk.v1.FunctionService/Run", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
        try:
            for _ in range(2):
                assert (await inv.run(url, request(), 5)).http_status == 200
        finally:
            await runner.cleanup()
        back = [r for r in caplog.records if "answers again" in r.getMessage()]
        assert len(back) == 1 and url in back[0].getMessage()
    finally:
        await inv.close()
