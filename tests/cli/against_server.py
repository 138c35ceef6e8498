"""Helpers for commands run against a real ``dispatch-aio server`` in a test."""

from __future__ import annotations

import pytest
from e2e.harness import Server

from dispatch_aio import Client
from dispatch_aio.cli import main

UNSERVED = "http://127.0.0.1:9"
"""An endpoint where nothing listens: its calls are refused and retried (event waits,
answered by the scheduler itself, never reach it)."""


def client(server: Server) -> Client:
    """A client of `server` whose calls go to `UNSERVED`."""
    return Client(api_key=server.api_key, api_url=server.api_url, endpoint_url=UNSERVED, env={})


async def result(server: Server, dispatch_id: str) -> object:
    """The result of a call, within 5 s."""
    async with client(server) as c:
        return await c.result(dispatch_id, timeout=5)


def run(capsys: pytest.CaptureFixture[str], server: Server, *argv: str) -> tuple[int, str, str]:
    """Run the command `argv` against `server`; return its status, output and errors."""
    capsys.readouterr()
    status = main([*argv, "--api-url", server.api_url, "--api-key", server.api_key])
    out, err = capsys.readouterr()
    return status, out, err
