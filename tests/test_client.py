"""The Dispatch API client against a fake DispatchService on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import aiohttp
import pytest
from aiohttp import web
from endpoint_driver import DISPATCH_PATH, FakeAPI, fake_api
from ports import free_port

from dispatch_aio import Call, Client, Dispatch, Status, errors
from dispatch_aio._codec import decode_input
from dispatch_aio._status import Classifier
from dispatch_aio.proto.sdk.v1 import dispatch_pb2


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async for api in fake_api():
        yield api


def make_client(api: FakeAPI, **kwargs: object) -> Client:
    options: dict[str, object] = {
        "api_key": "sk_test_0123456789",
        "api_url": api.url,
        "endpoint_url": "http://app.test:8000",
        "env": {},
    }
    options.update(kwargs)
    return Client(**options)  # type: ignore[arg-type]


def answer(status: int, body: bytes | str, content_type: str = "application/json") -> object:
    async def respond(request: web.Request) -> web.Response:
        data = body.encode() if isinstance(body, str) else body
        return web.Response(status=status, body=data, content_type=content_type)

    return respond


async def test_request_headers_and_body(api: FakeAPI) -> None:
    async with make_client(api) as client:
        ids = await client.dispatch(
            [
                Call("greet", ("World",)),
                Call(
                    "resize",
                    ("a.png",),
                    {"width": 3},
                    endpoint="https://other.test/fn",
                    expiration=timedelta(seconds=90),
                    version="v2",
                ),
            ]
        )
    assert ids == ["id-1", "id-2"]
    (received,) = api.received
    headers = received.headers
    assert headers["Authorization"] == "Bearer sk_test_0123456789"
    assert headers["Content-Type"] == "application/proto"
    assert headers["Connect-Protocol-Version"] == "1"
    assert headers["Connect-Timeout-Ms"] == "5000"
    greet, resize = received.request.calls
    assert greet.function == "greet"
    assert greet.endpoint == "http://app.test:8000"
    # A single primitive argument travels as itself, readable by other SDKs.
    assert greet.input.type_url == "type.googleapis.com/google.protobuf.StringValue"
    assert decode_input(greet.input) == (("World",), {})
    assert not greet.HasField("expiration")
    assert resize.endpoint == "https://other.test/fn"
    assert resize.expiration.ToTimedelta() == timedelta(seconds=90)
    assert resize.version == "v2"
    assert decode_input(resize.input) == (("a.png",), {"width": 3})


async def test_no_calls_make_no_request(api: FakeAPI) -> None:
    async with make_client(api) as client:
        assert await client.dispatch([]) == []
    assert api.received == []


def test_invalid_calls_fail_when_built() -> None:
    with pytest.raises(ValueError, match="invalid function name 'bad name'"):
        Call("bad name")
    with pytest.raises(ValueError, match="invalid endpoint 'ftp://x'"):
        Call("f", endpoint="ftp://x")
    with pytest.raises(ValueError, match="must not be negative"):
        Call("f", expiration=timedelta(seconds=-1))
    with pytest.raises(TypeError, match="argument 2 of function 'f'"):
        Call("f", (1, (i for i in range(3))))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ('{"code": "unauthenticated", "message": "invalid API key"}', "application/json"),
        ("Unauthorized", "text/plain"),
    ],
)
async def test_401_names_the_api_key_variable(api: FakeAPI, body: str, content_type: str) -> None:
    api.respond = answer(401, body, content_type)  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError, match="DISPATCH_API_KEY") as caught:
            await client.dispatch([Call("f")])
    assert caught.value.http_status == 401
    assert Classifier().status_for_error(caught.value) is Status.UNAUTHENTICATED
    assert "sk_test" not in str(caught.value)  # the key itself is never shown


async def test_connect_json_errors_are_mapped(api: FakeAPI) -> None:
    api.respond = answer(  # type: ignore[assignment]
        400, '{"code": "invalid_argument", "message": "Call endpoint cannot be empty"}'
    )
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError) as caught:
            await client.dispatch([Call("f")])
    error = caught.value
    assert (error.http_status, error.code) == (400, "invalid_argument")
    assert error.message.startswith("Call endpoint cannot be empty")
    assert "HTTP 400, invalid_argument" in str(error)
    assert Classifier().status_for_error(error) is Status.INVALID_ARGUMENT

    api.respond = answer(429, '{"code": "resource_exhausted", "message": "slow down"}')  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError, match=r"slow down.*rate limiting") as caught:
            await client.dispatch([Call("f")])
    assert Classifier().status_for_error(caught.value) is Status.THROTTLED

    # Too large: the scheduler says what to do; nothing about rate limits, and retrying
    # the same request cannot help.
    too_large = "the request submits 20000 calls, over the limit of 10000 per request"
    api.respond = answer(413, json.dumps({"code": "resource_exhausted", "message": too_large}))  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError) as caught:
            await client.dispatch([Call("f")])
    assert caught.value.message == too_large
    assert str(caught.value) == f"Dispatch API error (HTTP 413, resource_exhausted): {too_large}"
    assert Classifier().status_for_error(caught.value) is Status.PERMANENT_ERROR
    api.respond = answer(413, "", "text/plain")  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError, match="too large for the Dispatch API") as caught:
            await client.dispatch([Call("f")])
    assert Classifier().status_for_error(caught.value) is Status.PERMANENT_ERROR


async def test_non_json_error_bodies(api: FakeAPI) -> None:
    api.respond = answer(502, "<html>Bad Gateway</html>", "text/html")  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError) as caught:
            await client.dispatch([Call("f")])
    error = caught.value
    assert (error.http_status, error.code) == (502, "")
    assert "<html>Bad Gateway</html>" in error.message
    assert "may or may not have been created" in error.message
    assert Classifier().status_for_error(error) is Status.TEMPORARY_ERROR

    api.respond = answer(404, "404: Not Found", "text/plain")  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.ClientError, match="check DISPATCH_API_URL"):
            await client.dispatch([Call("f")])

    # A 200 that is not a DispatchResponse, or has the wrong number of ids.
    api.respond = answer(200, b"\xff\xff", "application/proto")  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.InvalidResponseError, match="not a DispatchResponse"):
            await client.dispatch([Call("f")])
    reply = dispatch_pb2.DispatchResponse(dispatch_ids=["a", "b"]).SerializeToString()
    api.respond = answer(200, reply, "application/proto")  # type: ignore[assignment]
    async with make_client(api) as client:
        with pytest.raises(errors.InvalidResponseError, match="2 dispatch ids for 1 calls"):
            await client.dispatch([Call("f")])


async def test_a_timeout_is_retried_with_the_same_keys(api: FakeAPI) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=500)

    api.respond = stall
    async with make_client(api, timeout=0.2, retries=1) as client:
        with pytest.raises(
            errors.DispatchTimeoutError, match=r"within 0\.2 s \(after 2 attempts\)"
        ) as caught:
            await client.dispatch([Call("f"), Call("g", idempotency_key="mine")])
    assert Classifier().status_for_error(caught.value) is Status.TIMEOUT
    release.set()
    await asyncio.sleep(0.1)
    # Sent twice with the same keys: a scheduler creates the calls once.
    first, second = (list(r.request.idempotency_keys) for r in api.received)
    assert first == second
    assert first[1] == "mine"
    assert len(first[0]) >= 16


class _Watch(logging.Handler):
    """Counts the client's retry messages and signals the first."""

    def __init__(self) -> None:
        super().__init__()
        self.retries = 0
        self.first = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1
            self.first.set()


@pytest.fixture
def watch(caplog: pytest.LogCaptureFixture) -> Iterator[_Watch]:
    caplog.set_level(logging.INFO, logger="dispatch_aio._client")
    watch = _Watch()
    logger = logging.getLogger("dispatch_aio._client")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


async def test_connection_refused_is_retried_then_raised(watch: _Watch) -> None:
    # A bound socket that does not listen refuses connections, and keeps the port from
    # being taken by another process meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = Client(
            api_key="k", api_url=f"http://127.0.0.1:{port}", endpoint_url="http://a.test", env={}
        )
        async with client:
            with pytest.raises(errors.TCPError, match=r"after 3 attempts.*check DISPATCH_API_URL"):
                await client.dispatch([Call("f")])
    assert watch.retries == 2
    assert Classifier().status_for_error(errors.TCPError()) is Status.TCP_ERROR


async def test_connection_refused_then_accepted_succeeds(watch: _Watch) -> None:
    port = free_port()
    api = FakeAPI()
    client = Client(
        api_key="k", api_url=f"http://127.0.0.1:{port}", endpoint_url="http://a.test", env={}
    )
    async with client:
        submit = asyncio.create_task(client.dispatch([Call("f", (1,))]))
        await watch.first.wait()  # the first attempt was refused
        app = web.Application()
        app.router.add_post(DISPATCH_PATH, api.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            assert await submit == ["id-1"]
        finally:
            await runner.cleanup()
    assert len(api.received) == 1


async def test_missing_api_key_fails_only_when_dispatching(api: FakeAPI) -> None:
    dispatch = Dispatch(env={"DISPATCH_API_URL": api.url, "DISPATCH_ENDPOINT_URL": "http://x"})

    @dispatch.function(name="job")
    async def job(n: int) -> int:
        return n

    assert await job(2) == 2  # in process: no configuration needed
    with pytest.raises(errors.ConfigurationError, match="DISPATCH_API_KEY") as caught:
        await job.dispatch(1)
    assert caught.value.variable == "DISPATCH_API_KEY"
    batch = dispatch.batch()
    batch.add(job, 1)
    with pytest.raises(errors.ConfigurationError, match="DISPATCH_API_KEY"):
        await batch.submit()
    assert api.received == []
    await dispatch.aclose()


async def test_missing_endpoint_url_names_its_variable(api: FakeAPI) -> None:
    async with make_client(api, endpoint_url=None) as client:
        with pytest.raises(errors.ConfigurationError, match="DISPATCH_ENDPOINT_URL"):
            await client.dispatch([Call("f")])
        # A call that names its endpoint needs none.
        assert await client.dispatch([Call("f", endpoint="http://e.test")]) == ["id-1"]


async def test_environment_configuration(api: FakeAPI) -> None:
    env = {
        "DISPATCH_API_KEY": "from-env-key",
        "DISPATCH_API_URL": api.url + "/",
        "DISPATCH_ENDPOINT_URL": "http://env.test/",
    }
    async with Client(env=env) as client:
        await client.dispatch([Call("f")])
    assert api.received[0].headers["Authorization"] == "Bearer from-env-key"
    assert api.calls()[0].endpoint == "http://env.test"


async def test_injected_session_is_used_and_left_open(api: FakeAPI) -> None:
    async with aiohttp.ClientSession(headers={"X-Injected": "yes"}) as session:
        client = make_client(api, session=session)
        await client.dispatch([Call("f")])
        await client.aclose()
        assert not session.closed
    assert api.received[0].headers["X-Injected"] == "yes"


def test_client_survives_successive_event_loops() -> None:
    # A script may call asyncio.run() twice with one Dispatch object, without closing it.
    clients: list[Client] = []

    async def submit(name: str, close: bool) -> list[str]:
        async for api in fake_api():
            if not clients:
                clients.append(make_client(api))
            client = clients[0]
            client._config = make_client(api)._config  # this loop's fake API
            ids = await client.dispatch([Call(name)])
            if close:
                await client.aclose()
            return ids
        raise AssertionError("unreachable")

    assert asyncio.run(submit("f", close=False)) == ["id-1"]
    # The session bound to the first, closed loop is replaced.
    assert asyncio.run(submit("g", close=True)) == ["id-1"]
