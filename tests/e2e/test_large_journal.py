"""A call holding more than 16 MB of results resumes in a restarted app.

The restarted app does not hold the run live, so the scheduler resends the call's whole
journal: two 9 MB results, more than the protocol's 16 MB body limit. The endpoint
admits it because the scheduler's signature checks out before the body is read.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from ports import free_port

from dispatch_aio.proto.v1 import inspect_pb2

from .conftest import Stack
from .harness import PYTHON, Starter, start_server, wait_for_port
from .test_workloads import output

APP = textwrap.dedent(
    """
    import asyncio
    import os

    from dispatch_aio import Dispatch

    dispatch = Dispatch()


    @dispatch.function
    async def blob(megabytes: int, fill: str) -> bytes:
        return fill.encode() * (megabytes * 1_000_000)


    @dispatch.function
    async def workflow() -> str:
        first = await blob(9, "a")
        second = await blob(9, "b")
        print("sleeping in", os.getpid(), flush=True)
        await asyncio.sleep(3)  # the app is killed and restarted here
        print("resumed in", os.getpid(), flush=True)
        return f"{len(first)} {first[:1]!r} {len(second)} {second[:1]!r}"


    if __name__ == "__main__":
        dispatch.run()
    """
)


async def test_a_restarted_app_resumes_a_call_holding_18_mb_of_results(
    procs: Starter, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    port = free_port()
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "data"), "--endpoint",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    env = server.app_env(
        DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}", DISPATCH_ENDPOINT_URL=f"http://127.0.0.1:{port}"
    )

    def start_app() -> None:
        app = procs([PYTHON, str(script)], env=env)
        wait_for_port(port, proc=app)
        stack.app = app

    stack = Stack(server, None, f"http://127.0.0.1:{port}")  # type: ignore[arg-type]
    start_app()
    first = stack.app
    dispatch_id = await stack.submit("workflow")
    first.wait_for("sleeping in", timeout=60)
    async with stack.inspect() as inspect:
        for _ in range(200):  # until the sleep is a suspension the scheduler holds
            info = await inspect.wait_call(dispatch_id, 0)
            if info.state == inspect_pb2.CALL_STATE_SUSPENDED:
                break
            await asyncio.sleep(0.05)
        assert info.state == inspect_pb2.CALL_STATE_SUSPENDED, info
    first.kill()
    start_app()

    info = await stack.wait(dispatch_id, max_wait=60)
    assert output(info) == "9000000 b'a' 9000000 b'b'"
    assert any("resumed in" in line for line in stack.app.out), stack.app.dump()
