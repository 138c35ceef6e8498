"""Fixtures of the end-to-end tests: a scheduler and the workloads application, for real."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

from dispatch_aio import Call, Client
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.proto.v1 import inspect_pb2

from .harness import (
    PYTHON,
    Proc,
    Server,
    Starter,
    procs,
    start_server,
    started_procs,
    wait_for_port,
)

__all__ = ["Stack", "procs", "stack", "start_app"]

WORKLOADS = str(Path(__file__).with_name("workloads.py"))


@dataclass
class Stack:
    """A `dispatch-aio server` and the workloads application it calls."""

    server: Server
    app: Proc
    endpoint_url: str

    async def submit(self, function: str, *args: object, endpoint: str | None = None) -> str:
        async with Client(
            api_key=self.server.api_key,
            api_url=self.server.api_url,
            endpoint_url=self.endpoint_url,
            env={},
        ) as client:
            (dispatch_id,) = await client.dispatch([Call(function, args, endpoint=endpoint)])
        return dispatch_id

    def inspect(self) -> InspectClient:
        return InspectClient(self.server.api_url, self.server.api_key)

    async def wait(self, dispatch_id: str, max_wait: float = 20.0) -> inspect_pb2.CallInfo:
        async with self.inspect() as inspect:
            info = await inspect.wait_call(dispatch_id, max_wait)
        assert info.state == inspect_pb2.CALL_STATE_DONE, f"not done in {max_wait} s: {info}"
        return info

    async def call(
        self, function: str, *args: object, max_wait: float = 20.0
    ) -> tuple[inspect_pb2.CallInfo, float]:
        """Submit a call and wait for it; return it and the seconds it took."""
        start = time.perf_counter()
        info = await self.wait(await self.submit(function, *args), max_wait)
        return info, time.perf_counter() - start


def start_app(start: Starter, server: Server, port: int) -> Proc:
    """Start the workloads application on `port`; return once it listens."""
    env = server.app_env(
        DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}", DISPATCH_ENDPOINT_URL=f"http://127.0.0.1:{port}"
    )
    app = start([PYTHON, WORKLOADS], env=env)
    wait_for_port(port, proc=app)
    return app


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started_procs() as start:
        data = tmp_path_factory.mktemp("e2e") / "data"
        port = free_port()
        server = start_server(
            start, "--port", "0", "--data-dir", str(data), "--endpoint", f"127.0.0.1:{port}"
        )
        app = start_app(start, server, port)
        yield Stack(server, app, f"http://127.0.0.1:{port}")
