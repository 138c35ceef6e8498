"""Log records of durable functions: call id, function and attempt; the default output.

A new interpreter runs the application with ``dispatch.run()`` (or ``start()`` as under
``dispatch-aio run``) and the embedded scheduler on a real SQLite file; another program
submits over the scheduler's API on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from dispatch_aio import Call, Client

_APP = """
import asyncio, sys
import dispatch_aio
from dispatch_aio import Dispatch

dispatch = Dispatch(cache_size=0)  # every resume replays
log = dispatch_aio.get_logger("shop")
seen = []

@dispatch.function(name="charge")
async def charge(amount: int) -> int:
    seen.append(amount)
    log.info("charging %d, try %d", amount, len(seen))
    if len(seen) < 2:
        raise ConnectionError("card network down")  # temporary: retried
    await asyncio.sleep(1.5)  # suspends: the run replays after it, quietly
    log.info("charged %d", amount)
    return amount

if sys.argv[1] == "run":
    dispatch.run()
else:
    async def main():
        async with await dispatch.start():
            print(await dispatch.client.result(await charge.dispatch(5), timeout=30))
    asyncio.run(main())
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


async def test_start_under_a_log_format_writes_json_lines_with_call_and_attempt(
    tmp_path: Path,
) -> None:
    (tmp_path / "app.py").write_text(_APP)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(tmp_path / "app.py"),
        "start",
        env=_env(tmp_path, DISPATCH_LOG_FORMAT="json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out == b"5\n"
    records = [json.loads(line) for line in err.decode().splitlines()]  # every line is JSON
    shop = [r for r in records if r["logger"] == "shop"]
    assert [r["message"] for r in shop] == ["charging 5, try 1", "charging 5, try 2", "charged 5"]
    assert [r["attempt"] for r in shop] == [1, 2, 3]  # the resume after the sleep is attempt 3
    assert {r["function"] for r in shop} == {"charge"}
    assert len({r["dispatch_id"] for r in shop}) == 1
    assert all(r["level"] == "INFO" and r["time"].endswith("+00:00") for r in shop)


async def test_run_prints_durable_loggers_by_default_quiet_on_replay(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(_APP)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(tmp_path / "app.py"),
        "run",
        env=_env(tmp_path, DISPATCH_SCHEDULER_ADDR="127.0.0.1:0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            first = (await proc.stderr.readline()).decode()
        assert "running Dispatch functions" in first, first  # the API's address is published
        settings = json.loads((tmp_path / "data" / "scheduler.json").read_text())
        async with Client(
            api_url=settings["api_url"], api_key=settings["api_key"], env={}
        ) as client:
            (dispatch_id,) = await client.dispatch(
                [Call("charge", (7,), endpoint="http://127.0.0.1:8000")]
            )
            assert await client.result(dispatch_id, timeout=30) == 7
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in err.decode().splitlines() if " shop " in line]
    assert first.startswith("INFO dispatch_aio._dispatch: running Dispatch functions")
    assert lines == [
        f"INFO shop [charge {dispatch_id} attempt 1]: charging 7, try 1",
        f"INFO shop [charge {dispatch_id} attempt 2]: charging 7, try 2",
        f"INFO shop [charge {dispatch_id} attempt 3]: charged 7",
    ]
