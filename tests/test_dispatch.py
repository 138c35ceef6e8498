"""Dispatch: registration, end to end runs over HTTP, serving, mounting and submitting."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from endpoint_driver import Driver, FakeAPI, Outcome, fake_api, serve_app

import dispatch_aio
from dispatch_aio import Dispatch, Function, Status, errors
from dispatch_aio._codec import decode_input
from dispatch_aio._signature import public_key_to_base64


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async for api in fake_api():
        yield api


@pytest.fixture
async def api2() -> AsyncIterator[FakeAPI]:
    async for api in fake_api():
        yield api


def make_dispatch(key: Ed25519PrivateKey | None = None, **kwargs: Any) -> Dispatch:
    kwargs.setdefault("env", {})
    kwargs.setdefault("endpoint_addr", "127.0.0.1:0")
    # A separate scheduler (never reached unless a test submits): serve over HTTP.
    kwargs.setdefault("api_url", "http://127.0.0.1:9")
    if key is not None:
        kwargs.setdefault("verification_key", public_key_to_base64(key.public_key()))
    return Dispatch(**kwargs)


# -- registration ---------------------------------------------------------------------


def test_function_is_registered_under_its_qualified_name_or_the_given_one() -> None:
    dispatch = make_dispatch()

    @dispatch.function
    async def plain(x: int) -> int:
        return x

    @dispatch.function(name="renamed.v2")
    async def other(x: int) -> int:
        return x

    assert isinstance(plain, Function)
    assert plain.name.endswith("<locals>.plain")
    # Introspected as the function it decorates.
    assert (plain.__name__, plain.__qualname__, plain.__module__) == (
        "plain",
        plain.name,
        __name__,
    )
    assert list(inspect.signature(plain).parameters) == ["x"]
    assert other.name == "renamed.v2"
    assert dict(dispatch.functions) == {plain.name: plain, "renamed.v2": other}
    with pytest.raises(TypeError):
        dispatch.functions["x"] = plain  # type: ignore[index]


def test_bad_registrations_fail_at_decoration_with_clear_errors() -> None:
    dispatch = make_dispatch()

    with pytest.raises(ValueError, match=r"invalid function name 'has-dash'.*name="):

        @dispatch.function(name="has-dash")
        async def dashed() -> None:
            pass

    with pytest.raises(TypeError, match=r"is not a function: register an `async def` or a `def`"):
        dispatch.function(42)  # type: ignore[call-overload]

    with pytest.raises(TypeError, match=r"name='work'"):
        dispatch.function("work")  # type: ignore[call-overload]

    @dispatch.function(name="work")
    async def first() -> None:
        pass

    with pytest.raises(ValueError, match=r"'work' is already registered .*first.*name="):

        @dispatch.function(name="work")
        async def second() -> None:
            pass

    assert list(dispatch.functions) == ["work"]


async def test_an_unregistered_function_cannot_be_dispatched() -> None:
    async def job() -> None:
        pass

    with pytest.raises(RuntimeError, match=r"not registered with a Dispatch.*@dispatch\.function"):
        await Function(job, "job").dispatch()


async def test_outside_a_run_a_call_runs_in_process() -> None:
    dispatch = make_dispatch()
    seen = []

    @dispatch.function
    async def double(x: int) -> int:
        seen.append(x)
        return 2 * x

    assert await double(21) == 42
    assert seen == [21]


# -- end to end over HTTP ---------------------------------------------------------------


async def test_end_to_end_fan_out_errors_and_tail_calls(
    key: Ed25519PrivateKey, session: aiohttp.ClientSession
) -> None:
    dispatch = make_dispatch(key)

    @dispatch.function(name="double")
    async def double(x: int) -> int:
        return 2 * x

    @dispatch.function(name="fan_out")
    async def fan_out(n: int) -> list[int]:
        return list(await asyncio.gather(*(double(i) for i in range(n))))

    @dispatch.function(name="fail")
    async def fail(x: int) -> int:
        raise ValueError(f"bad input {x}")

    @dispatch.function(name="catch")
    async def catch(x: int) -> str:
        try:
            await fail(x)
        except ValueError as exc:
            return f"caught: {exc}"
        return "not raised"

    @dispatch.function(name="countdown")
    async def countdown(n: int, trail: str = "") -> str:
        if n == 0:
            return trail + "done"
        countdown.tail_call(n - 1, trail=f"{trail}{n},")

    async with dispatch, await dispatch.start() as server:
        driver = Driver(session, server.url, key=key)

        assert await driver.call("fan_out", 5) == Outcome(Status.OK, [0, 2, 4, 6, 8])
        children = [r for r in driver.requests if r.function == "double"]
        assert sorted(decode_input(r.input)[0] for r in children) == [(i,) for i in range(5)]

        assert await driver.call("catch", 7) == Outcome(Status.OK, "caught: bad input 7")

        failed = await driver.call("fail", 3)
        assert failed.status is Status.INVALID_ARGUMENT
        assert isinstance(failed.error, ValueError)
        assert str(failed.error) == "bad input 3"

        before = len(driver.requests)
        assert await driver.call("countdown", 3) == Outcome(Status.OK, "3,2,1,done")
        assert [r.function for r in driver.requests[before:]] == ["countdown"] * 4


async def test_durable_sleep_suspends_and_resumes_after_max_wait(
    key: Ed25519PrivateKey, session: aiohttp.ClientSession
) -> None:
    dispatch = make_dispatch(key, live_timer_threshold=0.2)

    @dispatch.function(name="nap")
    async def nap(seconds: float) -> float:
        start = dispatch_aio.now()
        await asyncio.sleep(seconds)
        return (dispatch_aio.now() - start).total_seconds()

    async with dispatch, await dispatch.start() as server:
        driver = Driver(session, server.url, key=key)
        began = time.monotonic()
        outcome = await driver.call("nap", 1.2)
        elapsed = time.monotonic() - began

    assert outcome.status is Status.OK
    assert outcome.output >= 1.2
    assert elapsed >= 1.2
    # It suspended (a Poll with max_wait, no calls) instead of sleeping in the request.
    assert [resp.WhichOneof("directive") for resp in driver.responses] == ["poll", "exit"]
    assert driver.waits and 1.0 <= driver.waits[0] <= 1.3


async def test_two_dispatch_objects_in_one_process_do_not_interfere(
    key: Ed25519PrivateKey, session: aiohttp.ClientSession, api: FakeAPI, api2: FakeAPI
) -> None:
    one = make_dispatch(key, api_key="key-one", api_url=api.url, endpoint_url="http://one.test")
    two = make_dispatch(key, api_key="key-two", api_url=api2.url, endpoint_url="http://two.test")

    @one.function(name="work")
    async def work_one(x: int) -> int:
        return x + 1

    @two.function(name="work")
    async def work_two(x: int) -> int:
        return x * 10

    async with one, two, await one.start() as server_one, await two.start() as server_two:
        assert await Driver(session, server_one.url, key=key).call("work", 3) == Outcome(
            Status.OK, 4
        )
        assert await Driver(session, server_two.url, key=key).call("work", 3) == Outcome(
            Status.OK, 30
        )
        assert await work_one.dispatch(5) == "id-1"
        assert await work_two.dispatch(6) == "id-1"

    assert [(c.function, c.endpoint) for c in api.calls()] == [("work", "http://one.test")]
    assert [(c.function, c.endpoint) for c in api2.calls()] == [("work", "http://two.test")]
    assert api.received[0].headers["Authorization"] == "Bearer key-one"
    assert api2.received[0].headers["Authorization"] == "Bearer key-two"
    assert decode_input(api.calls()[0].input) == ((5,), {})
    assert decode_input(api2.calls()[0].input) == ((6,), {})


# -- submitting calls ---------------------------------------------------------------------


async def test_dispatch_and_batch_submit_through_the_api(api: FakeAPI) -> None:
    dispatch = make_dispatch(api_key="secret", api_url=api.url, endpoint_url="http://app.test")

    @dispatch.function(name="resize")
    async def resize(path: str, *, width: int) -> str:
        return f"{path}@{width}"

    async with dispatch:
        assert await resize.dispatch("a.png", width=10) == "id-1"
        batch = dispatch.batch()
        assert await batch.submit() == []  # nothing to send
        batch.add(resize, "b.png", width=20)
        batch.add(resize, "c.png", width=30)
        assert len(batch) == 2
        assert await batch.submit() == ["id-2", "id-3"]
        assert len(batch) == 0

    assert len(api.received) == 2  # one request per submission: the batch is atomic
    assert [decode_input(c.input) for c in api.calls()] == [
        (("a.png",), {"width": 10}),
        (("b.png",), {"width": 20}),
        (("c.png",), {"width": 30}),
    ]
    assert {c.endpoint for c in api.calls()} == {"http://app.test"}
    assert dispatch.client._session is None  # closed by `async with dispatch`


async def test_batch_rejects_a_function_of_another_dispatch_object() -> None:
    one, two = make_dispatch(), make_dispatch()

    @two.function(name="elsewhere")
    async def elsewhere() -> None:
        pass

    with pytest.raises(ValueError, match="not a function of this batch's Dispatch"):
        one.batch().add(elsewhere)


async def test_failed_batch_keeps_its_calls(api: FakeAPI) -> None:
    dispatch = make_dispatch(api_key="secret", api_url=api.url, endpoint_url="http://app.test")

    @dispatch.function(name="job")
    async def job(n: int) -> None:
        pass

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"code": "unavailable", "message": "down"}, status=503)

    api.respond = refuse
    async with dispatch:
        batch = dispatch.batch()
        batch.add(job, 1)
        with pytest.raises(errors.ClientError, match="down"):
            await batch.submit()
        assert len(batch) == 1
        api.respond = None
        assert await batch.submit() == ["id-1"]


async def test_dispatch_from_inside_a_durable_function(
    key: Ed25519PrivateKey, session: aiohttp.ClientSession, api: FakeAPI
) -> None:
    dispatch = make_dispatch(key, api_key="k", api_url=api.url, endpoint_url="http://me.test")

    @dispatch.function(name="target")
    async def target(x: int) -> int:
        return x

    @dispatch.function(name="submit")
    async def submit(x: int) -> str:
        return await target.dispatch(x)

    async with dispatch, await dispatch.start() as server:
        outcome = await Driver(session, server.url, key=key).call("submit", 9)

    assert outcome == Outcome(Status.OK, "id-1")
    assert [(c.function, c.endpoint) for c in api.calls()] == [("target", "http://me.test")]


# -- mounting into an application ---------------------------------------------------------


async def test_mounted_in_an_app_with_its_own_routes_and_middleware(
    key: Ed25519PrivateKey, session: aiohttp.ClientSession, api: FakeAPI
) -> None:
    dispatch = make_dispatch(key, api_key="k", api_url=api.url, endpoint_url="http://app.test")

    @dispatch.function(name="greet")
    async def greet(name: str) -> str:
        return f"hello {name}"

    @web.middleware
    async def tag(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["X-App"] = "mine"
        return response

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="own route")

    async def submit(request: web.Request) -> web.Response:
        return web.json_response({"id": await greet.dispatch(request.query["name"])})

    app = web.Application(middlewares=[tag])
    app.router.add_get("/hello", hello)
    app.router.add_post("/submit", submit)
    app.add_routes(dispatch.routes())
    app.cleanup_ctx.append(dispatch.cleanup_ctx)
    runner, url = await serve_app(app)
    try:
        async with session.get(url + "/hello") as resp:
            assert (resp.status, await resp.text(), resp.headers["X-App"]) == (
                200,
                "own route",
                "mine",
            )
        async with session.post(url + "/submit", params={"name": "ada"}) as resp:
            assert await resp.json() == {"id": "id-1"}
        assert await Driver(session, url, key=key).call("greet", "bob") == Outcome(
            Status.OK, "hello bob"
        )
        async with session.get(url + "/hello") as resp:
            assert resp.status == 200
        assert dispatch.client._session is not None
    finally:
        await runner.cleanup()

    assert [decode_input(c.input) for c in api.calls()] == [(("ada",), {})]
    assert api.calls()[0].endpoint == "http://app.test"
    assert dispatch.client._session is None  # released by the cleanup context


async def test_mounted_under_a_prefix_and_in_a_sub_application(
    key: Ed25519PrivateKey, session: aiohttp.ClientSession
) -> None:
    dispatch = make_dispatch(key)

    @dispatch.function(name="echo")
    async def echo(x: str) -> str:
        return x

    sub = web.Application()
    sub.add_routes(dispatch.routes())
    app = web.Application()
    app.add_subapp("/dispatch", sub)
    app.add_routes(dispatch.routes(prefix="/v2"))
    app.cleanup_ctx.append(dispatch.cleanup_ctx)
    runner, url = await serve_app(app)
    try:
        # The signed path includes the prefix.
        for base in (url + "/dispatch", url + "/v2"):
            assert await Driver(session, base, key=key).call("echo", base) == Outcome(
                Status.OK, base
            )
    finally:
        await runner.cleanup()
    with pytest.raises(ValueError, match="invalid route prefix"):
        dispatch.routes(prefix="dispatch/")


# -- standalone serving ---------------------------------------------------------------------


async def test_refuses_a_non_loopback_address_without_a_key_unless_insecure(
    key: Ed25519PrivateKey,
) -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        await make_dispatch(endpoint_addr="0.0.0.0:0").start()
    message = str(caught.value)
    assert "refusing to serve on 0.0.0.0:0" in message
    assert "DISPATCH_VERIFICATION_KEY" in message and "DISPATCH_INSECURE=1" in message
    assert caught.value.variable == "DISPATCH_VERIFICATION_KEY"

    for dispatch in (
        make_dispatch(endpoint_addr="0.0.0.0:0", insecure=True),
        make_dispatch(endpoint_addr="0.0.0.0:0", env={"DISPATCH_INSECURE": "yes"}),
        make_dispatch(key, endpoint_addr="0.0.0.0:0"),
    ):
        server = await dispatch.start()
        assert server.host == "0.0.0.0" and server.port > 0
        await server.aclose()


async def test_logs_a_warning_without_a_key_and_the_address_when_serving(
    key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dispatch_aio")
    async with await make_dispatch().start() as server:
        pass
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (
        logging.WARNING,
        "request signature verification is disabled because DISPATCH_VERIFICATION_KEY is "
        "not set: anyone who can reach this endpoint can run its functions",
    ) in messages
    line = f"serving Dispatch functions on {server.url}, for the scheduler at http://127.0.0.1:9"
    assert (logging.INFO, line) in messages

    caplog.clear()
    async with await make_dispatch(key).start():
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    b64 = public_key_to_base64(key.public_key())
    assert f"verifying request signatures with key {b64}" in caplog.messages

    caplog.clear()  # behind a bridge, requests cannot be signed: no warning
    async with await make_dispatch(endpoint_url="bridge://session").start():
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_invalid_verification_key_fails_at_start() -> None:
    with pytest.raises(errors.ConfigurationError, match="DISPATCH_VERIFICATION_KEY"):
        await make_dispatch(verification_key="not a key").start()


async def test_graceful_shutdown_lets_in_flight_runs_finish(
    session: aiohttp.ClientSession,
) -> None:
    dispatch = make_dispatch()
    started = asyncio.Event()

    @dispatch.function(name="slow")
    async def slow(x: int) -> int:
        started.set()
        await asyncio.sleep(0.5)  # under the live timer threshold: the run stays in flight
        return x

    server = await dispatch.start()
    driver = Driver(session, server.url)
    call = asyncio.create_task(driver.call("slow", 4))
    await started.wait()
    await server.aclose()
    assert await call == Outcome(Status.OK, 4)
    await server.aclose()  # closing again does nothing
    with pytest.raises(aiohttp.ClientConnectionError):
        await Driver(session, server.url).call("slow", 5)


async def test_serve_runs_until_cancelled_then_releases_resources(
    caplog: pytest.LogCaptureFixture, session: aiohttp.ClientSession, api: FakeAPI
) -> None:
    caplog.set_level(logging.INFO, logger="dispatch_aio")
    dispatch = make_dispatch(api_key="k", api_url=api.url, endpoint_url="http://x.test")

    @dispatch.function(name="ping")
    async def ping() -> str:
        return "pong"

    prefix = "serving Dispatch functions on "
    listening = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(prefix):
                listening.set()

    watch = Watch()
    logging.getLogger("dispatch_aio").addHandler(watch)
    try:
        serving = asyncio.create_task(dispatch.serve())
        await listening.wait()
    finally:
        logging.getLogger("dispatch_aio").removeHandler(watch)
    line = next(m for m in caplog.messages if m.startswith(prefix))
    url = line.removeprefix(prefix).split(",")[0]
    assert await Driver(session, url).call("ping") == Outcome(Status.OK, "pong")
    await ping.dispatch()
    assert dispatch.client._session is not None
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert dispatch.client._session is None


async def test_address_in_use_names_the_variable() -> None:
    async with await make_dispatch().start() as server:
        with pytest.raises(OSError, match=r"DISPATCH_ENDPOINT_ADDR") as info:
            await make_dispatch(endpoint_addr=f"127.0.0.1:{server.port}").start()
    message = str(info.value)
    assert message.count("Errno") == 1 and "the address is in use" in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__


_RUN_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from dispatch_aio import Dispatch

dispatch = Dispatch()

@dispatch.function(name="square")
async def square(x: int) -> int:
    return x * x

dispatch.run()
print("returned")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_run_serves_until_a_signal_and_prints_nothing(
    session: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["DISPATCH_ENDPOINT_ADDR"] = "127.0.0.1:0"
    env["DISPATCH_API_URL"] = "http://127.0.0.1:9"  # a separate scheduler: serve over HTTP
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RUN_SCRIPT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, f"the process ended early: {''.join(lines)}"
                lines.append(line)
                if "serving Dispatch functions on " in line:
                    break
        url = line.split("serving Dispatch functions on ")[1].split(",")[0]
        assert await Driver(session, url).call("square", 7) == Outcome(Status.OK, 49)
        proc.send_signal(sig)
        async with asyncio.timeout(20):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert stdout == b"returned\n"  # run() returned, and printed nothing itself
    assert "WARNING request signature verification is disabled" in "".join(lines)
    assert "stopping: waiting for in-flight runs to finish" in stderr.decode()


def test_endpoint_addr_reads_the_configuration() -> None:
    from dispatch_aio import Dispatch as _Dispatch

    assert _Dispatch(env={}).endpoint_addr() == ("127.0.0.1", 8000)
    assert _Dispatch(env={"DISPATCH_ENDPOINT_ADDR": "[::1]:9000"}).endpoint_addr() == ("::1", 9000)
    assert _Dispatch(endpoint_addr="0.0.0.0:1234", env={}).endpoint_addr() == ("0.0.0.0", 1234)


SERVED_ELSEWHERE = """
import os, signal, sys, threading
from dispatch_aio import Dispatch

dispatch = Dispatch(env={
    "DISPATCH_API_URL": "http://127.0.0.1:9", "DISPATCH_API_KEY": "k",
    "DISPATCH_ENDPOINT_ADDR": "127.0.0.1:0", "DISPATCH_VERIFICATION_KEY": sys.argv[1],
})

@dispatch.function
async def double(x: int) -> int:
    return 2 * x

threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
dispatch.run()  # until the SIGINT
print(sorted(m for m in sys.modules if m.startswith("dispatch_aio.scheduler")))
"""


async def test_an_app_served_by_another_scheduler_never_loads_the_scheduler() -> None:
    # Its engine, store, web UI and their dependencies are for programs that run one.
    key = public_key_to_base64(Ed25519PrivateKey.generate().public_key())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVED_ELSEWHERE, key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "[]"
