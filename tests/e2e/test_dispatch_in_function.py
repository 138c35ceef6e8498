"""`fn.dispatch()` inside a durable function creates its call once, across crashes.

The app runs its embedded scheduler on a data folder of its own and is SIGKILLed twice:
once while the submitting run is in flight (it runs again from its input), once while it
is suspended (a new interpreter replays it from its journal). Each replay submits again
and must get the first submission's dispatch id back: the scheduler holds one call per
submission in the code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import textwrap
import time
from pathlib import Path

from .harness import PYTHON, Starter

APP = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    from dispatch_aio import Dispatch

    dispatch = Dispatch()
    LOG = os.environ["EVENT_LOG"]


    def note(line: str) -> None:
        with open(LOG, "a") as log:
            log.write(f"{line} {os.getpid()}\\n")


    @dispatch.function
    async def child(tag: str) -> str:
        return tag


    @dispatch.function
    async def parent() -> str:
        first = await child.dispatch("a")  # fire and forget
        note(f"dispatched a {first}")
        await asyncio.sleep(0.6)  # waited out live: the run is in flight
        second = await child.dispatch("b")
        note(f"dispatched b {second}")
        await asyncio.sleep(2)  # a durable timer: the run suspends
        return f"{first} {second}"


    async def main() -> None:
        async with await dispatch.start():
            if sys.argv[1] == "submit":
                print("submitted", await parent.dispatch(), flush=True)
            else:
                print("result", await dispatch.client.result(sys.argv[2]), flush=True)
            await asyncio.Event().wait()


    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def _events(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines() if line]


def _wait_for(log: Path, tag: str, pid: int, proc_dump: object) -> None:
    end = time.monotonic() + 30
    while not any(e[1] == tag and int(e[3]) == pid for e in _events(log)):
        assert time.monotonic() < end, proc_dump
        time.sleep(0.01)


def test_a_replayed_dispatch_returns_the_first_dispatch_id(procs: Starter, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    log = tmp_path / "events.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["EVENT_LOG"] = str(log)

    first = procs([PYTHON, str(script), "submit"], cwd=tmp_path, env=env)
    parent_id = first.wait_for("^submitted ", timeout=30).split()[1]
    _wait_for(log, "a", first.pid, first)
    os.kill(first.pid, signal.SIGKILL)  # during the live sleep: the attempt was in flight
    first.popen.wait(10)

    second = procs([PYTHON, str(script), "resume", parent_id], cwd=tmp_path, env=env)
    _wait_for(log, "b", second.pid, second)
    time.sleep(0.5)  # suspended on its durable timer, the journal in the store
    os.kill(second.pid, signal.SIGKILL)
    second.popen.wait(10)

    third = procs([PYTHON, str(script), "resume", parent_id], cwd=tmp_path, env=env)
    result = third.wait_for("^result ", timeout=30).split()[1:]
    os.kill(third.pid, signal.SIGKILL)
    third.popen.wait(10)

    events = _events(log)
    ids = {tag: {e[2] for e in events if e[1] == tag} for tag in ("a", "b")}
    # Submitted by three processes (a: three times, b: twice), one dispatch id each.
    assert [len([e for e in events if e[1] == "a"]), len(ids["a"]), len(ids["b"])] == [3, 1, 1]
    assert result == [*ids["a"], *ids["b"]]
    with contextlib.closing(sqlite3.connect(tmp_path / ".dispatch" / "scheduler.db")) as db:
        rows = db.execute("SELECT input FROM calls WHERE function = 'child'").fetchall()
    assert len(rows) == 2, rows
