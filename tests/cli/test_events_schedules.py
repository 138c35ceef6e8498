"""``dispatch-aio send-event`` and ``dispatch-aio schedule`` against a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e.harness import Server, Starter, start_server

from dispatch_aio import Call
from dispatch_aio._reserved import WAIT_EVENT
from dispatch_aio.errors import PermanentError

from .against_server import client, result, run


async def wait_on(server: Server, key: str) -> str:
    async with client(server) as c:
        (dispatch_id,) = await c.dispatch([Call(WAIT_EVENT, (key,))])
        return dispatch_id


def test_send_event_with_a_json_value_or_an_error(
    procs: Starter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(procs, "--port", "0", "--data-dir", str(tmp_path / "data"))
    waiting = asyncio.run(wait_on(server, "k1"))
    status, out, _ = run(capsys, server, "send-event", "k1", '{"n": [1, 2]}')
    assert (status, out) == (0, "event 'k1' resolved; 1 call was waiting and resumed\n")
    assert asyncio.run(result(server, waiting)) == {"n": [1, 2]}
    status, _, err = run(capsys, server, "send-event", "k1", "2")
    assert status == 1 and "the event 'k1' is already resolved" in err, err
    failing = asyncio.run(wait_on(server, "k2"))
    status, out, _ = run(capsys, server, "send-event", "k2", "--error", "out of stock")
    assert status == 0, out
    with pytest.raises(PermanentError, match="out of stock"):
        asyncio.run(result(server, failing))
    status, _, err = run(capsys, server, "send-event", "k3", "yes")
    assert status == 2 and "VALUE must be JSON" in err, err
    status, _, err = run(capsys, server, "send-event", "k3", "1", "--error", "x")
    assert status == 2 and "not both" in err, err


def test_schedule_commands(
    procs: Starter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "data"), "--endpoint", "127.0.0.1:9"
    )
    status, out, _ = run(
        capsys, server, "schedule", "create", "report", '"sales"', "--cron", "0 2 * * *",
        "--tz", "Europe/Paris", "--missed", "once", "--id", "nightly",
    )  # fmt: skip
    assert status == 0 and out.startswith(
        "created nightly  report  cron '0 2 * * *' Europe/Paris  missed=once  next "
    ), out
    status, out, _ = run(capsys, server, "schedule", "pause", "nightly")
    assert status == 0 and out.endswith("missed=once  paused\n"), out
    status, out, _ = run(capsys, server, "schedule", "resume", "nightly")
    assert status == 0 and "  next " in out, out
    status, out, _ = run(capsys, server, "schedule", "list")
    assert status == 0 and out.startswith("nightly  report  cron"), out
    status, _, err = run(capsys, server, "schedule", "create", "report", "--cron", "0 25 * * *")
    assert status == 1 and "invalid cron expression '0 25 * * *'" in err, err
    status, out, _ = run(capsys, server, "schedule", "delete", "nightly")
    assert (status, out) == (0, "deleted nightly\n")
    status, _, err = run(capsys, server, "schedule", "delete", "nightly")
    assert status == 1 and "no schedule with id 'nightly'" in err, err
    status, out, err = run(capsys, server, "schedule", "list")
    assert (status, out, err) == (0, "", "no schedules\n")
