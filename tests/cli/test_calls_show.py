"""``call``, ``show`` with its requests, id prefixes and wake times, and ``calls`` offline.

A real ``dispatch-aio server``, the example app as a process, and the commands run in
this process against them (or, once the server stopped, against its database).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import time
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON, Starter, start_server
from ports import free_port

from dispatch_aio.cli._calls import offline_api
from dispatch_aio.cli._console import Console
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.proto.v1 import inspect_pb2
from dispatch_aio.scheduler import SQLiteStore
from dispatch_aio.scheduler.store import CallQuery

from .apps import EXAMPLE_APP, write_app
from .test_server import inspect


def test_a_call_made_while_the_app_is_down_shows_why_then_runs(
    procs: Starter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    data = str(tmp_path / "data")
    server = start_server(
        procs, "--port", "0", "--data-dir", data, "--endpoint", f"127.0.0.1:{port}"
    )
    # Submitted while nothing serves the endpoint: refused, and retried.
    status, out, err = inspect(capsys, server, "call", "total", "4")
    assert status == 0, err
    dispatch_id = out.strip()
    assert len(dispatch_id) == 32
    deadline = time.monotonic() + 10
    while True:
        status, out, err = inspect(capsys, server, "show", dispatch_id[-8:])  # its end
        assert status == 0, err
        # Between attempts (not caught with a retry in flight), once one was refused.
        waiting = "next attempt at " in out and out.count("connection refused") >= 2
        if waiting or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    refused = f"connection refused by 127.0.0.1:{port}: nothing listens there (the app was not"
    assert refused in out
    assert "ClientConnectorError" not in out
    assert "next attempt at " in out
    assert "requests:" in out and "  1. " in out

    app = write_app(tmp_path, EXAMPLE_APP)
    procs([PYTHON, str(app)], env=server.app_env(APP_MODE="serve", APP_PAUSE="1.5"))
    # --wait prints the result; the earlier call ran once the app served it.
    status, out, err = inspect(capsys, server, "call", "--wait", "total", "3", "--timeout", "30")
    assert (status, out) == (0, "6\n"), err
    # A call sleeping durably says when it wakes.
    _, out, _ = inspect(capsys, server, "call", "total", "2")
    sleeping = out.strip()
    deadline = time.monotonic() + 10
    while "wakes at" not in out and time.monotonic() < deadline:
        _, out, _ = inspect(capsys, server, "show", sleeping)
        time.sleep(0.1)
    assert "wakes at " in out
    deadline = time.monotonic() + 30  # its retries back off: it may still be waiting
    while True:
        status, out, err = inspect(capsys, server, "show", dispatch_id, "--json")
        doc = json.loads(out)
        if doc["state"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    log = doc["request_log"]
    assert log[0]["status"] == "tcp_error" and log[0]["outcome"].startswith("connection refused")
    outcomes = [entry["outcome"] for entry in log]
    first_run = outcomes.index("suspended, made 4 calls")
    assert set(outcomes[:first_run]) == {log[0]["outcome"]}  # refused until the app ran
    assert outcomes[-1] == "ok" and set(outcomes[first_run + 1 : -1]) == {"suspended"}
    assert doc["output"] == "12"
    assert doc["attempts"] == first_run + 1 and doc["requests"] == len(log)
    # A prefix that names several calls, or none.
    status, _, err = inspect(capsys, server, "show", "abcdef0123")
    assert status == 1 and "no call with a dispatch id beginning or ending with" in err
    status, _, err = inspect(capsys, server, "show", dispatch_id[:4])  # made together
    assert status == 1 and "calls have a dispatch id beginning or ending with" in err, err
    status, out, _ = inspect(capsys, server, "show", dispatch_id[:20])
    assert out.startswith("total  ok")
    # A bad argument is refused before anything is sent.
    status, _, err = inspect(capsys, server, "call", "no-dash-allowed")
    assert status == 2 and "invalid function name" in err

    server.proc.send(signal.SIGINT)
    assert server.proc.wait(15) == 0
    # No scheduler runs: the commands read its database.
    for name in ("DISPATCH_API_URL", "DISPATCH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    status, out, err = inspect(capsys, None, "calls", "--data-dir", data)
    assert status == 0, err
    assert f"no scheduler runs: read from {data}/scheduler.db" in err
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["total"] * 3
    status, out, err = inspect(capsys, None, "show", dispatch_id[-10:], "--data-dir", data)
    assert status == 0 and "output: 12" in out, err
    status, _, err = inspect(capsys, None, "call", "total", "1", "--data-dir", data)
    assert status == 2 and "no scheduler runs" in err
    # --watch lists again and again until stopped.
    watch = procs([*CLI, "calls", "--watch", "0.2", "--data-dir", data])
    watch.wait_for(r"^-- \d\d:\d\d:\d\d")
    watch.wait_for(
        lambda line: (
            line.startswith("-- ") and len([x for x in watch.out if x.startswith("-- ")]) >= 2
        )
    )
    watch.send(signal.SIGINT)
    assert watch.wait(10) == 130


async def test_an_offline_listing_stops_at_once_with_a_read_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(tmp_path / "scheduler.db"))
    await store.open()
    await store.close()
    reading = asyncio.Event()

    async def slow_read(self: SQLiteStore, query: CallQuery) -> list[object]:
        reading.set()
        await asyncio.sleep(20)  # a read the machine is slow to finish
        return []

    monkeypatch.setattr(SQLiteStore, "list_calls", slow_read)
    console = Console(io.StringIO(), io.StringIO(), env={})

    async def listing() -> None:
        async with (
            offline_api(str(tmp_path), console) as (url, key),
            InspectClient(url, key) as client,
        ):
            await client.list_calls(inspect_pb2.ListCallsRequest())

    task = asyncio.ensure_future(listing())
    await asyncio.wait_for(reading.wait(), 10)
    stopped = time.monotonic()
    task.cancel()  # Ctrl-C: its own API server does not wait for that read
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert time.monotonic() - stopped < 5
