"""Subprocesses inside durable functions: their transports live on the host loop."""

from __future__ import annotations

import asyncio
import sys

from dispatch_aio._function import Function

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _communicate(text: str) -> tuple[str, int, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; sys.stdout.write(sys.stdin.read().upper())",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate(text.encode())
    assert proc.returncode is not None
    # A durable call after the subprocess: on replay the process runs again.
    return out.decode(), proc.returncode, await double(proc.returncode + 1)


communicate = Function(_communicate, name="communicate")


async def test_communicate(make_env: EnvFactory) -> None:
    env = make_env(communicate, double, virtual_time=False)
    assert await env.call(communicate, "durable") == ("DURABLE", 0, 2)


async def _shell_wait(code: int) -> tuple[int, int | None]:
    proc = await asyncio.create_subprocess_shell(f"exit {code}")
    returncode = await proc.wait()
    await double(1)
    return returncode, proc.returncode


shell_wait = Function(_shell_wait, name="shell_wait")


async def test_shell_and_wait(make_env: EnvFactory) -> None:
    env = make_env(shell_wait, double, virtual_time=False)
    assert await env.call(shell_wait, 3) == (3, 3)


async def _lines(n: int) -> list[int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-c",
        f"import time\nfor i in range({n}):\n    print(i)\n    time.sleep(0.01)",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    out = []
    while line := await proc.stdout.readline():
        # A durable call per line, made while the process still runs.
        out.append(await double(int(line)))
    await proc.wait()
    return out


lines = Function(_lines, name="lines")


async def test_read_stdout_line_by_line(make_env: EnvFactory) -> None:
    env = make_env(lines, double, virtual_time=False)
    assert await env.call(lines, 5) == [0, 2, 4, 6, 8]


async def _kill_after(seconds: float) -> tuple[str, int]:
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        await asyncio.wait_for(proc.wait(), seconds)
        outcome = "exited"
    except TimeoutError:
        outcome = "timed out"
        proc.kill()
    return outcome, await proc.wait()


kill_after = Function(_kill_after, name="kill_after")


async def test_wait_for_a_process_then_kill_it(make_env: EnvFactory) -> None:
    env = make_env(kill_after, virtual_time=False)
    outcome, returncode = await env.call(kill_after, 0.1)
    assert outcome == "timed out"
    assert returncode < 0
