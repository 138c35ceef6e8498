"""The rest of the forwarded I/O surface: datagrams, sockets, servers, sendfile."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest

from dispatch_aio._function import Function

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data.upper(), addr)


@pytest.fixture
async def udp_echo() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    yield transport.get_extra_info("sockname")[1]
    transport.close()


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)


async def _datagrams(port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _Client, remote_addr=("127.0.0.1", port)
    )
    out = []
    try:
        for word in ("a", "b"):
            transport.sendto(word.encode())
            out.append((await asyncio.wait_for(protocol.received.get(), 5)).decode())
            await double(1)
    finally:
        transport.close()
    return out


datagrams = Function(_datagrams, name="datagrams")


async def test_datagram_endpoint(make_env: EnvFactory, udp_echo: int) -> None:
    env = make_env(datagrams, double, virtual_time=False)
    assert await env.call(datagrams, udp_echo) == ["A", "B"]


@pytest.fixture
async def tcp_upper() -> AsyncIterator[int]:
    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(upper, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _raw_socket(port: int) -> str:
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"hello\n")
        data = b""
        while not data.endswith(b"\n"):
            data += await loop.sock_recv(sock, 100)
    await double(1)
    return data.decode()


raw_socket = Function(_raw_socket, name="raw_socket")


async def test_sock_methods(make_env: EnvFactory, tcp_upper: int) -> None:
    env = make_env(raw_socket, double, virtual_time=False)
    assert await env.call(raw_socket, tcp_upper) == "HELLO\n"


async def _own_server(words: list[str]) -> list[str]:
    async def reverse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.strip()[::-1] + b"\n")
        writer.close()

    out = []
    async with await asyncio.start_server(reverse, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for word in words:
            writer.write(word.encode() + b"\n")
            out.append((await reader.readline()).decode().strip())
        writer.close()
        await writer.wait_closed()
    out.append(str(await double(len(out))))
    return out


own_server = Function(_own_server, name="own_server")


async def test_start_server_inside_a_function(make_env: EnvFactory) -> None:
    env = make_env(own_server, double, virtual_time=False)
    assert await env.call(own_server, ["abc", "xy"]) == ["cba", "yx", "4"]


async def _serve_forever_then_stop() -> str:
    served = asyncio.Event()

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi\n")
        writer.close()
        served.set()

    server = await asyncio.start_server(hello, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    serving = asyncio.create_task(server.serve_forever())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = await reader.readline()
    writer.close()
    await served.wait()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    await double(1)
    return f"{line.decode().strip()} {server.is_serving()}"


serve_forever_then_stop = Function(_serve_forever_then_stop, name="serve_forever_then_stop")


async def test_serve_forever_and_cancel(make_env: EnvFactory) -> None:
    env = make_env(serve_forever_then_stop, double, virtual_time=False)
    assert await env.call(serve_forever_then_stop) == "hi False"


def _sends_a_file(path: str) -> Function[[int], str]:
    async def _sendfile(port: int) -> str:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with open(path, "rb") as file:  # noqa: ASYNC230
            sent = await loop.sendfile(writer.transport, file)
        lines = [await reader.readline() for _ in range(2)]
        writer.close()
        await double(1)
        return f"{sent} {b''.join(lines).decode()}"

    return Function(_sendfile, name="sendfile")


async def test_sendfile(make_env: EnvFactory, tcp_upper: int, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"one\ntwo\n")
    sendfile = _sends_a_file(str(path))
    env = make_env(sendfile, double, virtual_time=False)
    assert await env.call(sendfile, tcp_upper) == "8 ONE\nTWO\n"
