"""A new user's first hour, scripted: each mistake of the friction log and what it prints.

Real processes throughout: ``dispatch-aio run``/``server``/``calls``/``check`` and the
user's scripts in new interpreters, a real SQLite database in the test's folder. Other
items have their own tests: sync functions (tests/test_sync_functions.py), host-loop
sessions and pools (tests/test_host_objects.py), ``show`` and ``call``
(test_calls_show.py), ``check`` beside a scheduler (test_check.py), the test
environment's expiry (tests/test_testing_expiry.py), the API key kept with the data and
the wrong-Python hint (test_run.py), the busy port (tests/test_dispatch.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON, Starter, start_server

from dispatch_aio import Call, Client, errors
from dispatch_aio.cli._console import Console
from dispatch_aio.cli._progress import CallTracker, Progress
from dispatch_aio.scheduler.store import CallRecord, InsertCall, Phase, UpdateCall

from .apps import write_app

SHOP = """
import asyncio
import dispatch_aio
from dispatch_aio import Dispatch

dispatch = Dispatch()
log = dispatch_aio.get_logger("shop")


@dispatch.function
def checksum(text: str) -> int:  # blocking code: a plain def, run in a thread
    return sum(map(ord, text))


@dispatch.function
async def validate(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


@dispatch.function
async def order(x: int) -> int:
    log.info("order %d", x)
    try:
        await validate(x)
    except ValueError:
        return -1
    return await checksum(str(x))


async def main() -> None:
    async with await dispatch.start():
        ids = [await order.dispatch(5), await order.dispatch(-3)]
        print([await dispatch.client.result(i, timeout=30) for i in ids])


asyncio.run(main())
"""

MISTAKES = """
import asyncio, sys
from dispatch_aio import Dispatch

dispatch = Dispatch()
other = Dispatch()


@dispatch.function
async def store(f) -> None: ...


@other.function
async def greet(name: str) -> str:
    return name


async def main() -> None:
    async with await dispatch.start():
        if sys.argv[1] == "file":
            with open(__file__) as f:
                await store.dispatch(f)
        else:
            await greet.dispatch("World")


asyncio.run(main())
"""

NO_GUARD = """
from dispatch_aio import Dispatch

dispatch = Dispatch()


@dispatch.function
async def greet(name: str) -> str:
    return name


dispatch.run()
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_logs_json_and_filters_that_find_a_failed_child(tmp_path: Path) -> None:
    app = write_app(tmp_path, SHOP)
    data = str(tmp_path / "data")
    run = _cli(
        "run", "--data-dir", data, "--endpoint", "127.0.0.1:0", "--log-format", "json", "--",
        PYTHON, str(app),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "app      | [53, -1]" in run.stdout  # the plain def ran in a thread
    # The user's durable logger printed, one JSON object per line, naming call and attempt.
    records = [
        json.loads(line.partition("| ")[2])
        for line in run.stderr.splitlines()
        if '"logger": "shop"' in line
    ]
    assert sorted(r["message"] for r in records) == ["order -3", "order 5"]
    assert {(r["function"], r["attempt"]) for r in records} == {("order", 1)}
    # After the run, the database still answers; the filter finds the failed child.
    calls = _cli("calls", "--status", "invalid_argument", "--data-dir", data)
    assert calls.returncode == 0, calls.stderr
    rows = calls.stdout.splitlines()[1:]
    assert [row.split()[1:3] for row in rows] == [["order", "ok"], ["\u2514\u2500", "validate"]]
    listed = json.loads(_cli("calls", "--all", "--json", "--data-dir", data).stdout)
    states = {c["function"]: (c["state"], c["attempts"]) for c in listed["calls"]}
    assert states["validate"] == ("invalid_argument", 1)
    assert states["order"] == ("ok", 1)  # suspended and resumed: still one attempt


def test_mistakes_say_what_happened_and_what_to_do(tmp_path: Path) -> None:
    app = write_app(tmp_path, MISTAKES)
    env = {"DISPATCH_DATA_DIR": str(tmp_path / "data")}
    for arg, expected in [
        (
            "file",
            "dispatch_aio.errors.EncodeError: cannot encode argument 1 of function 'store': "
            "object of type '_io.TextIOWrapper' cannot be pickled (TypeError: an open file",
        ),
        (
            "other",
            "dispatch_aio.errors.ConfigurationError: no scheduler to submit to: 'greet' is "
            "registered with a Dispatch object that does not run its scheduler",
        ),
    ]:
        proc = subprocess.run(
            [PYTHON, str(app), arg],
            env={**_clean_env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1
        assert expected in proc.stderr, proc.stderr
        assert proc.stderr.count(expected.partition(": ")[0]) == 1  # said once
        assert "Unclosed client session" not in proc.stderr
    # check on a script that starts the app when imported.
    write_app(tmp_path, NO_GUARD, "noguard.py")
    check = _cli("check", f"{tmp_path / 'noguard.py'}:dispatch", "--data-dir", str(tmp_path))
    assert check.returncode == 1
    assert 'put that under `if __name__ == "__main__":`' in check.stderr
    assert "coroutine" not in check.stderr  # no "never awaited" warning


def test_a_call_that_never_ran_and_one_that_expired(
    procs: Starter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "d"), "--endpoint", f"127.0.0.1:{port}"
    )

    async def trial() -> None:
        async with Client(
            api_url=server.api_url,
            api_key=server.api_key,
            endpoint_url=f"http://127.0.0.1:{port}",  # nothing serves it
            env={},
        ) as client:
            (waiting,) = await client.dispatch([Call("greet", ("x",))])
            with pytest.raises(errors.DispatchTimeoutError) as info:
                await client.result(waiting, timeout=1)
            assert "has not run after 1 s: its" in str(info.value)
            assert "connection refused by 127.0.0.1" in str(info.value)
            assert "is the app running" in str(info.value)
            short = Call("greet", ("y",), expiration=timedelta(seconds=1))
            (expiring,) = await client.dispatch([short])
            with pytest.raises(TimeoutError, match="the call expired"):
                await client.result(expiring, timeout=30)

    asyncio.run(trial())


def test_the_status_line_counts_calls_waiting_to_retry() -> None:
    out = StringIO()
    console = Console(out, StringIO(), color=False, live=True)
    tracker = CallTracker()
    progress = Progress(console, tracker)
    call = CallRecord(
        id="a", root_id="a", parent_id="", correlation_id=0, parent_generation=0,
        endpoint="http://127.0.0.1:8000", function="f", input=b"", version="",
        created_at=1.0, expires_at=100.0, phase=Phase.PENDING, updated_at=1.0,
    )  # fmt: skip
    tracker.applied([InsertCall(call)])
    assert progress.status_text(tracker.counts()).startswith("1 pending, 0 running")
    failed = CallRecord(**{**_fields(call), "attempts": 1, "status": 14, "last_error": "down"})
    tracker.applied([UpdateCall(failed)])
    text = progress.status_text(tracker.counts())
    assert text.startswith("0 pending, 0 running, 0 suspended, 1 retrying, 0 done"), text


def test_each_retry_is_a_line_and_an_outage_stays_readable() -> None:
    out = StringIO()
    console = Console(out, StringIO(), color=False, live=False)  # piped, not a terminal
    tracker = CallTracker()
    Progress(console, tracker, prefix="dispatch | ")
    call = CallRecord(
        id="a", root_id="a", parent_id="", correlation_id=0, parent_generation=0,
        endpoint="http://127.0.0.1:8000", function="f", input=b"", version="",
        created_at=1.0, expires_at=100.0, phase=Phase.PENDING, updated_at=1.0,
    )  # fmt: skip
    tracker.applied([InsertCall(call)])
    refused = "connection refused by 127.0.0.1:8000"
    for attempts in range(1, 10):
        failed = {**_fields(call), "attempts": attempts, "status": 14, "last_error": refused}
        tracker.applied([UpdateCall(CallRecord(**failed))])
        tracker.applied([UpdateCall(CallRecord(**failed))])
    lines = out.getvalue().splitlines()
    # The 1st, 2nd, 4th and 8th failure in a row; a record written again is no new one.
    assert lines == [
        f"dispatch | retry  f(): attempt failed{times}: {refused}; retried  a"
        for times in ("", " (2 in a row)", " (4 in a row)", " (8 in a row)")
    ]


def _fields(rec: CallRecord) -> dict[str, object]:
    return rec._asdict()


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}


assert sys.version_info >= (3, 11)
