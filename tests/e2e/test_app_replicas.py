"""Two app processes as replicas of one endpoint, under `dispatch-aio server --replica`.

Each replica is its own interpreter. A function prints each step it runs with its
process id; steps are separated by durable sleeps, so each one is a resume. While the
calls run, one replica is SIGKILLed: its calls go on on the other replica, which replays
them, and every call finishes with its result. A resume never lands on the wrong replica
while both are up: no step of a call runs twice before the kill.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path

from ports import free_ports

from .conftest import Stack
from .harness import CLI, PYTHON, Starter, start_server, wait_for_port
from .test_workloads import output

ENDPOINT = "http://app.invalid:8000"  # what the calls name; the scheduler maps it

APP = textwrap.dedent(
    """
    import asyncio
    import os

    from dispatch_aio import Dispatch

    dispatch = Dispatch(live_timer_threshold=0.0)


    @dispatch.function
    async def steps(tag: str, n: int) -> str:
        for i in range(n):
            print("step", tag, i, os.getpid(), flush=True)
            await asyncio.sleep(0.01)  # suspends: the next step is a resume
        return tag


    if __name__ == "__main__":
        dispatch.run()
    """
)


def ran(lines: list[str]) -> list[tuple[str, int]]:
    found = (re.fullmatch(r"step (\S+) (\d+) \d+", line) for line in list(lines))
    return [(m[1], int(m[2])) for m in found if m]


async def test_resumes_follow_their_replica_and_survive_its_loss(
    procs: Starter, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "data"),
        "--replica", f"{ENDPOINT}={','.join(urls)}",
    )  # fmt: skip
    apps = []
    for port in ports:
        env = server.app_env(DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}")
        app = procs([PYTHON, str(script)], env=env)
        wait_for_port(port, proc=app)
        apps.append(app)
    stack = Stack(server, apps[0], ENDPOINT)

    tags = [f"t{i}" for i in range(12)]
    ids = [await stack.submit("steps", tag, 3, endpoint=ENDPOINT) for tag in tags]
    deadline = asyncio.get_running_loop().time() + 30
    while not all(ran(app.out) for app in apps):  # both replicas hold calls
        assert asyncio.get_running_loop().time() < deadline, [a.dump() for a in apps]
        await asyncio.sleep(0.05)
    before = [ran(app.out) for app in apps]
    for steps in before:  # while both are up, no step of a call ran twice
        assert len(steps) == len(set(steps)), steps
    assert not {t for t, _ in before[0]} & {t for t, _ in before[1]}

    apps[0].kill()
    results = [output(await stack.wait(dispatch_id, max_wait=60)) for dispatch_id in ids]
    assert results == tags
    moved = {t for t, _ in before[0]} - {t for t, i in before[0] if i == 2}
    assert moved, "the killed replica held no unfinished call: the kill showed nothing"
    survivor = ran(apps[1].out)
    for tag in moved:  # replayed on the other replica, from its first step
        assert (tag, 0) in survivor and (tag, 2) in survivor, (tag, survivor)


def test_a_malformed_replica_option_is_a_usage_error(procs: Starter, tmp_path: Path) -> None:
    proc = procs([*CLI, "server", "--replica", "http://app:8000", "--data-dir", str(tmp_path)])
    assert proc.wait(30) == 2, proc.dump()
    assert "invalid --replica 'http://app:8000': give ENDPOINT=URL,URL..." in proc.stderr


def test_a_malformed_version_endpoint_is_a_usage_error(procs: Starter, tmp_path: Path) -> None:
    args = [*CLI, "server", "--version-endpoint", "1.4", "--data-dir", str(tmp_path)]
    proc = procs(args)
    assert proc.wait(30) == 2, proc.dump()
    assert "invalid --version-endpoint '1.4': give VERSION=URL" in proc.stderr
