"""``dispatch-aio cancel``, and cancelled calls in ``calls`` and ``show`` (a real server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from e2e.harness import Server, Starter, start_server

from dispatch_aio import Call
from dispatch_aio.errors import CancelledCallError

from .against_server import client, result, run


async def submit(server: Server) -> str:
    async with client(server) as c:
        (dispatch_id,) = await c.dispatch([Call("f", (1,))])
        return dispatch_id


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
