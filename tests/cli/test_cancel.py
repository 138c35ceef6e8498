"""``dispatch-aio cancel``, and cancelled calls in ``calls`` and ``show`` (a real server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from e2e.harness import Server, Starter, start_server

from dispatch_aio import Call, Client
from dispatch_aio.cli import main
from dispatch_aio.errors import CancelledCallError

UNSERVED = "http://127.0.0.1:9"  # the call's endpoint: refused, so the call is retried


def client(server: Server) -> Client:
    return Client(api_key=server.api_key, api_url=server.api_url, endpoint_url=UNSERVED, env={})


async def submit(server: Server) -> str:
    async with client(server) as c:
        (dispatch_id,) = await c.dispatch([Call("f", (1,))])
        return dispatch_id


async def result(server: Server, dispatch_id: str) -> object:
    async with client(server) as c:
        return await c.result(dispatch_id, timeout=5)


def run(capsys: pytest.CaptureFixture[str], server: Server, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([*argv, "--api-url", server.api_url, "--api-key", server.api_key])
    out, err = capsys.readouterr()
    return status, out, err


def test_cancel_a_call_then_see_it_cancelled(
    procs: Starter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(procs, "--port", "0", "--data-dir", str(tmp_path / "data"))
    dispatch_id = asyncio.run(submit(server))
    assert run(capsys, server, "cancel", dispatch_id) == (
        0,
        f"cancelled {dispatch_id} (1 call stopped)\n",
        "",
    )
    status, out, _ = run(capsys, server, "cancel", dispatch_id)
    assert (status, out) == (0, f"{dispatch_id} had finished already: nothing to cancel\n")
    with pytest.raises(CancelledCallError, match=f"call {dispatch_id} \\(f\\) was cancelled"):
        asyncio.run(result(server, dispatch_id))
    status, out, _ = run(capsys, server, "calls")
    assert status == 0 and "cancelled" in out, out
    status, out, _ = run(capsys, server, "calls", "--json", "--status", "cancelled")
    assert status == 0 and [c["dispatch_id"] for c in json.loads(out)["calls"]] == [dispatch_id]
    status, out, _ = run(capsys, server, "calls", "--json", "--status", "ok")
    assert status == 0 and json.loads(out)["calls"] == []
    status, out, _ = run(capsys, server, "show", dispatch_id)
    assert status == 0 and "cancelled" in out, out
    status, _, err = run(capsys, server, "cancel", "no-such-id")
    assert status == 1
    assert "no call with dispatch id 'no-such-id'" in err
