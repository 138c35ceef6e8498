"""A schedule that fires every second makes each firing once across a scheduler SIGKILL.

The window is short (about 8 s, the scheduler killed and restarted in its middle) to
keep the test fast. Each firing's idempotency key holds its time: after the run, the
database must hold one key per second of the window, every one naming its own call,
and no other call of the function; the app must have run each call once.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import subprocess
import time
from pathlib import Path

from ports import free_ports

from .conftest import start_app
from .harness import CLI, Starter, start_server


async def test_every_second_exactly_once_across_a_scheduler_kill(
    procs: Starter, tmp_path: Path
) -> None:
    app_port, api_port = free_ports(2)
    data = tmp_path / "data"
    args = ["--port", str(api_port), "--data-dir", str(data), "--endpoint", f"127.0.0.1:{app_port}"]
    server = start_server(procs, *args)
    app = start_app(procs, server, app_port)

    def cli(*words: str) -> str:
        done = subprocess.run(
            [*CLI, "schedule", *words, "--api-url", server.api_url, "--api-key", server.api_key],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    created = await asyncio.to_thread(
        cli, "create", "tick", '"s"', "--every", "1", "--missed", "all", "--id", "ticker"
    )
    assert created.startswith("created ticker  tick  every 1 s  missed=all"), created
    await asyncio.sleep(4)
    server.proc.kill()  # SIGKILL: no chance to finish anything
    killed_at = time.time()
    await asyncio.sleep(0.5)
    server = start_server(procs, *args)  # a new process on the same database
    await asyncio.sleep(4)
    await asyncio.to_thread(cli, "pause", "ticker")
    listed = await asyncio.to_thread(cli, "list")
    assert "ticker  tick  every 1 s  missed=all  paused" in listed
    await asyncio.sleep(1.0)  # let the last calls run
    server.proc.send(2)
    server.proc.wait()

    db = sqlite3.connect(data / "scheduler.db")
    try:
        keys = db.execute(
            "SELECT key, dispatch_id FROM idempotency_keys WHERE key LIKE 'schedule:ticker:%'"
        ).fetchall()
        calls = db.execute("SELECT id, parent_id FROM calls WHERE function = 'tick'").fetchall()
    finally:
        db.close()
    times = sorted(int(key.rpartition(":")[2]) for key, _ in keys)
    print(f"{len(times)} firings over {(times[-1] - times[0]) / 1000:.0f} s")
    assert len(times) >= 7, times
    assert [b - a for a, b in itertools.pairwise(times)] == [1000] * (len(times) - 1)
    assert times[0] / 1000 < killed_at - 2 and times[-1] / 1000 > killed_at + 2
    assert len({dispatch_id for _, dispatch_id in keys}) == len(keys)
    assert sorted(i for i, _ in calls) == sorted(d for _, d in keys)
    assert all(parent == "" for _, parent in calls)
    ran = [line for line in app.out if line.startswith("tick s")]
    assert len(ran) == len(times), app.dump()
