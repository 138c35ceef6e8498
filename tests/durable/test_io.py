"""I/O inside durable functions is forwarded to the host loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from dispatch_aio import durable
from dispatch_aio._function import Function
from dispatch_aio.errors import HostLoopError

from .conftest import EnvFactory


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.json_response({"hello": request.query.get("name", "world")})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _fetch(url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body: dict[str, str] = await response.json()
    # A durable call after the I/O: the request runs again on replay.
    body["after"] = str(await double(1))
    return body


fetch = Function(_fetch, name="fetch")


async def test_aiohttp_request_inside_function(make_env: EnvFactory, server: str) -> None:
    env = make_env(fetch, double, virtual_time=False)
    assert await env.call(fetch, f"{server}/hello?name=durable") == {
        "hello": "durable",
        "after": "2",
    }


async def _resolve(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


resolve = Function(_resolve, name="resolve")


async def test_dns(make_env: EnvFactory) -> None:
    env = make_env(resolve, virtual_time=False)
    assert "127.0.0.1" in await env.call(resolve, "localhost")


async def _threads() -> list[str]:
    def work(x: int) -> str:
        return f"{x}@{threading.current_thread() is not threading.main_thread()}"

    loop = asyncio.get_running_loop()
    a = await asyncio.to_thread(work, 1)
    b = await loop.run_in_executor(None, work, 2)
    await double(3)
    return [a, b]


threads = Function(_threads, name="threads")


async def test_executors(make_env: EnvFactory) -> None:
    env = make_env(threads, double, virtual_time=False)
    assert await env.call(threads) == ["1@True", "2@True"]


def _host_bound_functions(
    misused: asyncio.Future[int], host_future: asyncio.Future[int]
) -> tuple[Function[[], int], Function[[], int]]:
    async def _misuse() -> int:
        return await misused

    async def _helper() -> int:
        async def on_host() -> int:
            return await host_future

        return await durable.run_on_host(on_host())

    return Function(_misuse, name="misuse"), Function(_helper, name="helper")


async def test_host_loop_object(make_env: EnvFactory) -> None:
    loop = asyncio.get_running_loop()
    awaited: asyncio.Future[int] = loop.create_future()
    host_future: asyncio.Future[int] = loop.create_future()
    loop.call_later(0.05, awaited.set_result, 5)
    loop.call_later(0.05, host_future.set_result, 7)
    direct, helper = _host_bound_functions(awaited, host_future)
    env = make_env(direct, helper, virtual_time=False)
    # A future of the host loop, awaited directly, is bridged as forwarded I/O is.
    assert await env.call(direct) == 5
    assert await env.call(helper) == 7


async def _gives_up_on_io() -> int:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.to_thread(time.sleep, 0.5), timeout=0.05)
    return await double(21)  # must go out at once, not wait for the abandoned thread


gives_up_on_io = Function(_gives_up_on_io, name="gives_up_on_io")


async def test_a_cancelled_forwarded_operation_does_not_stall_the_run(make_env: EnvFactory) -> None:
    env = make_env(gives_up_on_io, double, virtual_time=False)
    started = time.monotonic()
    assert await env.call(gives_up_on_io) == 42
    assert time.monotonic() - started < 5


def _holds_a_connection(port: int) -> Function[[], int]:
    async def _holds() -> int:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # The connection stays open across a durable call: the call must go out.
            return await double(21)
        finally:
            writer.close()

    return Function(_holds, name="holds")


async def test_an_open_connection_does_not_hold_back_calls(make_env: EnvFactory) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(idle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        holds = _holds_a_connection(port)
        env = make_env(holds, double, virtual_time=False)
        started = time.monotonic()
        assert await env.call(holds) == 42
        assert time.monotonic() - started < 5
    finally:
        server.close()


async def _timer_from_a_callback() -> int:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    loop.call_soon(lambda: loop.call_later(0.01, future.set_result, 20))
    return await future


timer_from_a_callback = Function(_timer_from_a_callback, name="timer_from_a_callback")


async def test_a_timer_set_from_a_callback_is_waited_for_like_io(make_env: EnvFactory) -> None:
    # Not durable (no task made it), it is waited for as I/O is, live and replayed alike.
    env = make_env(timer_from_a_callback, virtual_time=False)
    assert await env.call(timer_from_a_callback) == 20


async def test_host_loop_error_names_what_was_awaited(make_env: EnvFactory) -> None:
    other = asyncio.new_event_loop()  # neither the run's loop nor the host's
    try:
        misused: asyncio.Future[int] = other.create_future()
        misuse, _ = _host_bound_functions(misused, misused)
        env = make_env(misuse, virtual_time=False)
        error = (await env.run(misuse)).error
        assert isinstance(error, HostLoopError)
        assert str(error).startswith("a durable function awaited <Future pending")
        assert "another event loop" in str(error)
    finally:
        other.close()


# Made outside any function: the first run that has to wait on it binds it to its loop.
SHARED = asyncio.Semaphore(1)


async def _uses_a_shared_semaphore(x: int) -> int:
    async def one(i: int) -> int:
        async with SHARED:
            await asyncio.sleep(0)
            return i

    return await double(sum(await asyncio.gather(one(x), one(x + 1))))


uses_a_shared_semaphore = Function(_uses_a_shared_semaphore, name="uses_a_shared_semaphore")


@pytest.mark.parametrize("mode", ["live", "replay"])
async def test_a_primitive_made_outside_the_function_is_named(make_env: EnvFactory) -> None:
    env = make_env(uses_a_shared_semaphore, double)
    infos = [await env.run(uses_a_shared_semaphore, i) for i in range(2)]
    errors = [i.error for i in infos if i.error is not None]
    assert errors, "a second run cannot use the semaphore the first one bound"
    message = str(errors[0])
    assert isinstance(errors[0], HostLoopError)
    assert "Semaphore" in message
    assert "create it inside the function" in message
