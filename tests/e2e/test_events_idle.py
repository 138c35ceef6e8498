"""Calls waiting on durable events cost a scheduler process no CPU while nothing happens.

10,000 waits are submitted to a ``dispatch-aio server`` (as calls of the reserved wait
function, which the scheduler answers itself, plus a few made by functions of a real
app); the CPU time the server process uses over an idle interval is then measured.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from ports import free_port

from dispatch_aio import Call, Client
from dispatch_aio._reserved import WAIT_EVENT
from dispatch_aio.proto.v1 import inspect_pb2

from .conftest import Stack, start_app
from .harness import Starter, start_server
from .test_workloads import output

WAITERS = 10_000
IDLE = 3.0  # seconds measured
MAX_CPU = 0.1  # seconds of CPU allowed over IDLE (timers, GC): 3 % of one core


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_ten_thousand_waiters_cost_no_cpu_while_idle(procs: Starter, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "data"), "--endpoint",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    stack = Stack(server, start_app(procs, server, port), f"http://127.0.0.1:{port}")
    async with Client(api_key=server.api_key, api_url=server.api_url, env={}) as client:
        calls = [
            Call(WAIT_EVENT, (f"key-{i}",), endpoint=stack.endpoint_url) for i in range(WAITERS)
        ]
        ids: list[str] = []
        for start in range(0, WAITERS, 2000):  # requests under 1 MB
            ids.extend(await client.dispatch(calls[start : start + 2000]))
        app_ids = [await stack.submit("wait_for", f"key-{i}") for i in range(5)]
        async with stack.inspect() as inspect:
            for _ in range(400):  # until the app's functions are suspended on their waits
                states = [(await inspect.wait_call(i, 0)).state for i in app_ids]
                if all(s == inspect_pb2.CALL_STATE_SUSPENDED for s in states):
                    break
                await asyncio.sleep(0.05)
            assert all(s == inspect_pb2.CALL_STATE_SUSPENDED for s in states), states
        await asyncio.sleep(1.0)  # let the start-up work (look-ups, commits) settle
        pid = server.proc.pid
        before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(IDLE)
        used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
        print(f"{WAITERS + 5} waiters: {used:.3f} s of CPU over {elapsed:.2f} s idle")
        assert used <= MAX_CPU, f"the idle scheduler used {used:.3f} s of CPU in {elapsed:.2f} s"
        # The waiters still work: each receives its own event.
        assert await client.send_event("key-3", "three") == 2
        assert await client.result(ids[3], timeout=10) == "three"
        assert output(await stack.wait(app_ids[3])) == "'three'"
        assert await client.send_event("key-9999", 9999) == 1
        assert await client.result(ids[9999], timeout=10) == 9999
