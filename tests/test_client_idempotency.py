"""Idempotent submission through the client: keys by default, retries after a cut connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dispatch_aio import Call, Client, Dispatch
from dispatch_aio.errors import ClientError
from dispatch_aio.scheduler import Scheduler

API_KEY = "idempotency-test-key"
UNSERVED = "http://127.0.0.1:9"  # the calls' endpoint: never reached, they stay pending


class CuttingProxy:
    """A TCP proxy that cuts the first connection once the request reached the upstream.

    The first request is forwarded whole, and the connection to the client is dropped as
    soon as the upstream starts answering: the calls are committed, the client never
    learns their ids. Later connections are forwarded both ways.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        first = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        forward = asyncio.create_task(_pipe(reader, up_writer))
        try:
            if first:
                await up_reader.read(1)  # the upstream answers: the submission is committed
                writer.transport.abort()
            else:
                await _pipe(up_reader, writer)
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forward
            up_writer.close()
            writer.close()
            self._tasks.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with Scheduler(":memory:", api_key=API_KEY) as s:
        await s.serve()
        yield s


def client_for(url: str) -> Client:
    return Client(api_key=API_KEY, api_url=url, endpoint_url=UNSERVED, env={})


async def test_a_submission_cut_after_it_arrived_is_retried_and_made_once(
    scheduler: Scheduler,
) -> None:
    assert scheduler.url is not None
    proxy = CuttingProxy(int(scheduler.url.rpartition(":")[2]))
    await proxy.start()
    try:
        async with client_for(proxy.url) as client:
            ids = await client.dispatch([Call("f", (1,)), Call("g", (2,))])
    finally:
        await proxy.close()
    assert proxy.connections == 2  # the cut request, and its retry
    assert len(set(ids)) == 2
    assert scheduler.unfinished == 2  # not 4: the retry created nothing


async def test_with_options_submits_once_per_key(scheduler: Scheduler) -> None:
    assert scheduler.url is not None
    dispatch = Dispatch(
        env={},
        api_key=API_KEY,
        api_url=scheduler.url,
        endpoint_url=UNSERVED,
    )

    @dispatch.function
    async def charge(order: str, *, cents: int) -> None: ...

    once = charge.with_options(idempotency_key="charge-42")
    assert once.idempotency_key == "charge-42"
    first = await once.dispatch("42", cents=100)
    assert await once.dispatch("42", cents=100) == first
    assert await charge.dispatch("42", cents=100) != first  # a random key each time
    assert scheduler.unfinished == 2
    with pytest.raises(ClientError, match="same idempotency key 'k'") as info:
        await dispatch.client.dispatch(
            [Call("charge", idempotency_key="k"), Call("charge", idempotency_key="k")]
        )
    assert info.value.code == "invalid_argument"
    await dispatch.client.aclose()


async def test_the_embedded_scheduler_honours_keys(tmp_path: Path) -> None:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))

    @dispatch.function
    async def square(x: int) -> int:
        return x * x

    async with await dispatch.start():
        once = square.with_options(idempotency_key="sq-3")
        first = await once.dispatch(3)
        assert await dispatch.client.result(first, timeout=10) == 9
        assert await once.dispatch(3) == first
        with pytest.raises(ClientError, match="same idempotency key") as info:
            await dispatch.client.dispatch(
                [
                    Call("square", (1,), idempotency_key="k"),
                    Call("square", (2,), idempotency_key="k"),
                ]
            )
        assert info.value.code == "invalid_argument"


@pytest.mark.parametrize("key", ["", "x" * 257, "line\nbreak"])
def test_invalid_keys_are_refused_when_the_call_is_made(key: str) -> None:
    with pytest.raises(ValueError, match=r"invalid idempotency key .* 1 to 256 printable"):
        Call("f", idempotency_key=key)
    dispatch = Dispatch(env={})

    @dispatch.function
    async def f() -> None: ...

    with pytest.raises(ValueError, match="invalid idempotency key"):
        f.with_options(idempotency_key=key)
