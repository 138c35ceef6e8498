"""Deploying changed code under calls in flight, for real: patched() and divergences.

A `dispatch-aio server` runs 100 calls of an application, which is SIGKILLed while
they sleep and started again from a changed script (a new interpreter). The change
made under ``patched()`` lets every call in flight finish on the old branch while new
calls take the new one, with no divergence; a change made without it diverges, and
the divergence shows in both logs and in ``dispatch-aio show``.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path

from ports import free_port

from dispatch_aio import Call, Client
from dispatch_aio._codec import decode_value
from dispatch_aio.proto.v1 import inspect_pb2

from .harness import CLI, PYTHON, Server, Starter, start_server, wait_for_port

COMMON = """
import asyncio
import os

from dispatch_aio import Dispatch, patched

dispatch = Dispatch()


@dispatch.function
async def step_old(n: int) -> str:
    return f"old {n}"


@dispatch.function
async def step_new(n: int) -> str:
    return f"new {n}"
"""

V1 = """
@dispatch.function
async def work(n: int) -> tuple[str, int]:
    first = await step_old(n)
    await asyncio.sleep(4)  # the application is replaced here
    return first, os.getpid()


@dispatch.function
async def unpatched(n: int) -> tuple[str, int]:
    first = await step_old(n)
    await asyncio.sleep(4)
    return first, os.getpid()
"""

V2 = """
@dispatch.function
async def work(n: int) -> tuple[str, int]:
    if patched("new-step"):
        first = await step_new(n)
    else:
        first = await step_old(n)
    await asyncio.sleep(4)
    return first, os.getpid()


@dispatch.function
async def unpatched(n: int) -> tuple[str, int]:
    first = await step_new(n)  # changed without patched(): runs in flight diverge
    await asyncio.sleep(4)
    return first, os.getpid()
"""

MAIN = """

if __name__ == "__main__":
    dispatch.run()
"""

IN_FLIGHT = 100
DONE = inspect_pb2.CALL_STATE_DONE


async def _submit(server: Server, endpoint: str, calls: list[tuple[str, int]]) -> list[str]:
    async with Client(
        api_key=server.api_key, api_url=server.api_url, endpoint_url=endpoint, env={}
    ) as client:
        return await client.dispatch([Call(name, (n,)) for name, n in calls])


async def _calls(server: Server) -> dict[str, inspect_pb2.CallInfo]:
    from dispatch_aio.cli._inspect import InspectClient

    async with InspectClient(server.api_url, server.api_key) as inspect:
        found = await inspect.iter_calls(inspect_pb2.ListCallsRequest(top_level_only=True))
    return {info.dispatch_id: info for info in found}


async def _cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_a_patched_change_lets_calls_in_flight_finish_on_the_old_branch(
    procs: Starter, tmp_path: Path
) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "data"), "--endpoint",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    env = server.app_env(DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}", DISPATCH_ENDPOINT_URL=endpoint)
    v1, v2 = tmp_path / "v1" / "app.py", tmp_path / "v2" / "app.py"
    for path, body in ((v1, V1), (v2, V2)):
        path.parent.mkdir()
        path.write_text(textwrap.dedent(COMMON + body + MAIN))

    first = procs([PYTHON, str(v1)], env=env)
    wait_for_port(port, proc=first)
    old = await _submit(server, endpoint, [("work", n) for n in range(IN_FLIGHT)])
    (diverging,) = await _submit(server, endpoint, [("unpatched", 7)])
    for _ in range(200):  # until every call sleeps, past its first step
        calls = await _calls(server)
        if len(calls) == IN_FLIGHT + 1 and all(c.polls >= 2 for c in calls.values()):
            break
        await asyncio.sleep(0.05)
    assert all(c.polls >= 2 and c.state != DONE for c in calls.values()), calls
    first.kill()

    second = procs([PYTHON, str(v2)], env=env)
    wait_for_port(port, proc=second)
    new = await _submit(server, endpoint, [("work", n) for n in range(10)])
    calls = {}
    for _ in range(300):
        calls = await _calls(server)
        if len(calls) == IN_FLIGHT + 11 and all(c.state == DONE for c in calls.values()):
            break
        await asyncio.sleep(0.1)
    assert all(c.state == DONE for c in calls.values()), calls

    def output(dispatch_id: str) -> tuple[str, int]:
        info = calls[dispatch_id]
        assert not info.result.HasField("error"), info
        return decode_value(info.result.output)  # type: ignore[no-any-return]

    # In flight: replayed by the new interpreter, on the old branch, with no divergence.
    assert [output(i) for i in old] == [(f"old {n}", second.pid) for n in range(IN_FLIGHT)]
    assert all(calls[i].divergences == 0 for i in old)
    # New calls: the new branch.
    assert [output(i)[0] for i in new] == [f"new {n}" for n in range(10)]
    assert all(calls[i].divergences == 0 for i in new)

    # Changed without patched(): the call diverged, restarted, took the new code...
    assert output(diverging) == ("new 7", second.pid)
    assert calls[diverging].divergences == 1
    # ...and said so in the scheduler's log, the application's log and `show`.
    pattern = rf"call {diverging} \(unpatched\) diverged from its journal .*step_old.*app\.py:"
    assert any(re.search(pattern, line) for line in server.proc.err), server.proc.dump()
    assert sum("diverged from its journal" in line for line in server.proc.err) == 1
    assert any(f"call {diverging} of 'unpatched' diverged" in line for line in second.err), (
        second.dump()
    )
    api = ["--api-url", server.api_url, "--api-key", server.api_key]
    show = await _cli("show", diverging, *api)
    assert "1 divergence" in show, show
    listing = await _cli("calls", *api)
    [row] = [line for line in listing.splitlines() if line.startswith(diverging)]
    assert "(diverged 1x)" in row
