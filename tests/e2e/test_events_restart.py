"""A function waiting on a durable event survives a restart of the scheduler and the app.

Both are SIGKILLed while the function waits; new processes take over, and the event is
sent afterwards with ``dispatch-aio send-event``: the function, replayed by the new app,
receives the value once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from pathlib import Path

from ports import free_ports

from dispatch_aio.proto.v1 import inspect_pb2

from .conftest import Stack
from .harness import CLI, PYTHON, Starter, start_server, wait_for_port
from .test_workloads import output

APP = textwrap.dedent(
    """
    import os

    import dispatch_aio
    from dispatch_aio import Dispatch

    dispatch = Dispatch()


    @dispatch.function
    async def record(value: object) -> str:
        print("recorded", value, "in", os.getpid(), flush=True)
        return f"recorded {value}"


    @dispatch.function
    async def approve(key: str) -> str:
        print("waiting in", os.getpid(), flush=True)
        value = await dispatch_aio.wait_event(key, timeout=120)
        print("resumed in", os.getpid(), flush=True)
        return await record(value)


    if __name__ == "__main__":
        dispatch.run()
    """
)


async def test_an_event_reaches_a_waiter_across_scheduler_and_app_restarts(
    procs: Starter, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    app_port, api_port = free_ports(2)
    data = str(tmp_path / "data")

    def server_args() -> list[str]:
        return ["--port", str(api_port), "--data-dir", data, "--endpoint", f"127.0.0.1:{app_port}"]

    server = start_server(procs, *server_args())
    env = server.app_env(
        DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{app_port}",
        DISPATCH_ENDPOINT_URL=f"http://127.0.0.1:{app_port}",
    )

    def start_app() -> None:
        app = procs([PYTHON, str(script)], env=env)
        wait_for_port(app_port, proc=app)
        stack.app = app

    stack = Stack(server, None, f"http://127.0.0.1:{app_port}")  # type: ignore[arg-type]
    start_app()
    first_app = stack.app
    dispatch_id = await stack.submit("approve", "order-9")
    first_app.wait_for("waiting in")
    async with stack.inspect() as inspect:
        for _ in range(200):  # until the wait is a suspension the scheduler holds
            info = await inspect.wait_call(dispatch_id, 0)
            if info.state == inspect_pb2.CALL_STATE_SUSPENDED:
                break
            await asyncio.sleep(0.05)
        assert info.state == inspect_pb2.CALL_STATE_SUSPENDED, info
    first_app.kill()
    server.proc.kill()

    stack.server = start_server(procs, *server_args())  # a new scheduler process
    start_app()  # and a new app process

    def send(value: str) -> subprocess.CompletedProcess[str]:
        args = ["send-event", "order-9", value, "--api-url", stack.server.api_url]
        return subprocess.run(
            [*CLI, *args, "--api-key", stack.server.api_key],
            capture_output=True,
            text=True,
            timeout=30,
        )

    sent = await asyncio.to_thread(send, json.dumps({"ok": True}))
    assert sent.returncode == 0, sent.stderr
    assert "1 call was waiting" in sent.stdout
    info = await stack.wait(dispatch_id, max_wait=30)
    assert output(info) == "recorded {'ok': True}"
    again = await asyncio.to_thread(send, "2")
    assert again.returncode == 1
    assert "'order-9' is already resolved" in again.stderr
    resumed = [line for line in stack.app.out if line.startswith("resumed in")]
    recorded = [line for line in stack.app.out if line.startswith("recorded")]
    assert len(resumed) == 1 and len(recorded) == 1, stack.app.dump()
    assert not any(line.startswith(("resumed", "recorded")) for line in first_app.out)
