"""A call resumed by a restarted app sees the program's own classes, not look-alikes.

The app is one script (`python app.py`, as every example is written), its dataclass and
exception defined in the script itself. It is SIGKILLed while a call sleeps, and started
again: the new process replays the call's journal, whose values it must rebuild as its own
`Point` and `Boom`, or `isinstance` and `except Boom` silently take the other branch.
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
    import dataclasses
    import os

    from dispatch_aio import Dispatch

    dispatch = Dispatch()


    @dataclasses.dataclass
    class Point:
        x: int
        y: int


    class Boom(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(f"boom {code}")
            self.code = code


    @dispatch.function
    async def make_point(x: int) -> Point:
        return Point(x, x + 1)


    @dispatch.function
    async def boom(code: int) -> None:
        try:
            raise KeyError(code)
        except KeyError as exc:
            raise Boom(code) from exc


    @dispatch.function
    async def workflow(n: int) -> str:
        point = await make_point(n)
        print("sleeping in", os.getpid(), flush=True)
        await asyncio.sleep(4)  # the app is killed and restarted here
        print("resumed in", os.getpid(), flush=True)
        caught = "not caught"
        try:
            await boom(n)
        except Boom as exc:
            caught = f"caught {exc.code} from {type(exc.__cause__).__name__}"
        results = await asyncio.gather(boom(1), make_point(2), return_exceptions=True)
        return (
            f"{isinstance(point, Point)} {point} | {caught} | "
            f"{isinstance(results[0], Boom)} {isinstance(results[1], Point)}"
        )


    if __name__ == "__main__":
        dispatch.run()
    """
)


async def test_a_restarted_app_resumes_with_its_own_classes(procs: Starter, tmp_path: Path) -> None:
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
    dispatch_id = await stack.submit("workflow", 3)
    first.wait_for("sleeping in")
    async with stack.inspect() as inspect:
        for _ in range(100):  # until the sleep is a suspension the scheduler holds
            info = await inspect.wait_call(dispatch_id, 0)
            if info.state == inspect_pb2.CALL_STATE_SUSPENDED:
                break
            await asyncio.sleep(0.05)
        assert info.state == inspect_pb2.CALL_STATE_SUSPENDED, info
    first.kill()
    start_app()

    info = await stack.wait(dispatch_id, max_wait=30)
    assert output(info) == "True Point(x=3, y=4) | caught 3 from KeyError | True True"
    assert any("resumed in" in line for line in stack.app.out), stack.app.dump()
    assert not any("resumed in" in line for line in first.out)
