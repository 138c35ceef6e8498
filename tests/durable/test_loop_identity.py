"""Only the program's own operations take durable identities; library I/O never shifts them.

aiohttp arms timers and starts tasks (timeouts, DNS resolution, request writers,
keep-alive clean-up) in numbers that depend on I/O timing. Under forced replay,
with a server that answers after random delays, in chunks, and a DNS cache
that expires while a request runs, every seed must give the same result and
no spurious divergence.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from dispatch_aio._function import Function
from dispatch_aio.testing import Environment

SEEDS = 50


@pytest.fixture
async def jittery_server() -> AsyncIterator[tuple[str, int]]:
    """An HTTP server and a line server that answer after random delays, in pieces."""
    rng = random.Random()

    async def number(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(rng.random() * 0.004)
        response = web.StreamResponse()
        await response.prepare(request)
        body = request.query["x"].encode() * 50
        step = rng.choice((7, 30, len(body)))
        for start in range(0, len(body), step):
            await response.write(body[start : start + step])
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    async def lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            await asyncio.sleep(rng.random() * 0.003)
            for char in line.upper():
                writer.write(bytes([char]))
                await writer.drain()
        writer.close()

    app = web.Application()
    app.router.add_get("/number", number)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server = await asyncio.start_server(lines, "127.0.0.1", 0)
    line_port = server.sockets[0].getsockname()[1]
    yield f"http://localhost:{port}", line_port
    server.close()
    await runner.cleanup()


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _fetch_in_a_loop(url: str, line_port: int, rounds: int) -> list[int]:
    out: list[int] = []
    # The DNS cache expires while requests run, so aiohttp starts a resolution task
    # on some requests only, as after a long durable wait.
    connector = aiohttp.TCPConnector(ttl_dns_cache=0.002)
    timeout = aiohttp.ClientTimeout(total=30, sock_read=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in range(rounds):
            async with session.get(f"{url}/number", params={"x": str(i)}) as response:
                body = await response.read()
            out.append(await double(len(body)))
            reader, writer = await asyncio.open_connection("127.0.0.1", line_port)
            writer.write(b"abc\n")
            # The program's own timeout: a durable timer, cancelled when the line comes.
            line = await asyncio.wait_for(reader.readline(), 20)
            writer.close()
            await writer.wait_closed()
            out.append(await double(len(line)))
            # Durable timer after the I/O: its identity must not shift either.
            await asyncio.sleep(0.001)
    return out


fetch_in_a_loop = Function(_fetch_in_a_loop, name="fetch_in_a_loop")


async def test_library_timers_and_tasks_never_shift_identities(
    jittery_server: tuple[str, int],
) -> None:
    url, line_port = jittery_server
    expected = [2 * 50, 2 * 4, 2 * 50, 2 * 4]
    failures = []
    for seed in range(SEEDS):
        async with Environment(
            [fetch_in_a_loop, double],
            replay="always",
            shuffle=True,
            split=True,
            seed=seed,
            virtual_time=False,
        ) as env:
            info = await env.run(fetch_in_a_loop, url, line_port, 2)
        if info.error is not None or info.output != expected:
            failures.append(f"seed {seed}: {info.output!r} {info.error!r}")
    assert not failures, "\n".join(failures)
