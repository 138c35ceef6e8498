"""`python app.py` alone is durable: SIGKILLed mid-tree, run again, every call finishes.

The app runs its embedded scheduler on a data folder of its own. It is killed twice
while its call trees are in flight (children running, timers pending), each time by
SIGKILL, and each time started again as a new interpreter; the third run waits for the
results. Every accepted call must finish with the result its inputs give, and no leaf
may have been lost.
"""

from __future__ import annotations

import os
import re
import signal
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
    LOG = os.environ["LEAF_LOG"]


    @dispatch.function
    async def leaf(root: int, i: int) -> int:
        await asyncio.sleep(0.05)
        with open(LOG, "a") as log:
            log.write(f"{root} {i}\\n")
        return i * i


    @dispatch.function
    async def tree(root: int, n: int) -> int:
        total = 0
        for start in range(0, n, 4):
            parts = await asyncio.gather(*(leaf(root, i) for i in range(start, start + 4)))
            total += sum(parts)
            await asyncio.sleep(1.5)  # a durable timer: the call suspends
        return total


    async def main() -> None:
        async with await dispatch.start():
            if sys.argv[1] == "submit":
                ids = [await tree.dispatch(root, 12) for root in range(3)]
                print("submitted", *ids, flush=True)
            for dispatch_id in sys.argv[2:]:
                print("result", dispatch_id, await dispatch.client.result(dispatch_id), flush=True)
            await asyncio.Event().wait()


    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def _leaves(log: Path) -> set[tuple[int, int]]:
    if not log.exists():
        return set()
    pairs = (line.split() for line in log.read_text().splitlines() if line)
    return {(int(root), int(i)) for root, i in pairs}


def test_a_killed_script_finishes_its_calls_when_run_again(procs: Starter, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    log = tmp_path / "leaves.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["LEAF_LOG"] = str(log)

    first = procs([PYTHON, str(script), "submit"], cwd=tmp_path, env=env)
    ids = first.wait_for("^submitted ", timeout=30).split()[1:]
    assert len(ids) == 3
    # Kill once some leaves ran and the trees are in flight.
    end = time.monotonic() + 30
    while len(_leaves(log)) < 4 and time.monotonic() < end:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait(10)
    after_first = _leaves(log)
    assert 0 < len(after_first) < 36, after_first

    second = procs([PYTHON, str(script), "resume"], cwd=tmp_path, env=env)
    end = time.monotonic() + 30
    while len(_leaves(log)) < len(after_first) + 4 and time.monotonic() < end:
        time.sleep(0.02)
    os.kill(second.pid, signal.SIGKILL)
    second.popen.wait(10)
    assert len(_leaves(log)) < 36, "the trees ended before the second kill"

    third = procs([PYTHON, str(script), "resume", *ids], cwd=tmp_path, env=env)
    end = time.monotonic() + 60
    while sum(line.startswith("result ") for line in third.out) < 3:
        assert time.monotonic() < end and third.poll() is None, third.dump()
        time.sleep(0.05)
    os.kill(third.pid, signal.SIGKILL)
    results = {
        words[1]: int(words[2])
        for words in (line.split() for line in list(third.out))
        if words[0] == "result"
    }
    assert results == dict.fromkeys(ids, sum(i * i for i in range(12)))
    assert _leaves(log) == {(root, i) for root in range(3) for i in range(12)}
    assert "Traceback" not in third.stderr, third.dump()
    # The three trees at least, and the leaves the second kill caught in flight.
    picked = re.search(r"(\d+) unfinished calls picked up", third.stderr)
    assert picked is not None and int(picked[1]) >= 3, third.dump()


CANCEL_APP = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    from dispatch_aio import Dispatch
    from dispatch_aio.errors import CancelledCallError

    dispatch = Dispatch()
    LOG = os.environ["LEAF_LOG"]


    def note(line: str) -> None:
        with open(LOG, "a") as log:
            log.write(f"{line} {os.getpid()}\\n")


    @dispatch.function
    async def waits() -> None:
        note("started")
        try:
            await asyncio.sleep(3600)  # a durable timer: the call suspends
        except asyncio.CancelledError:
            note("cancelled")
            raise
        finally:
            note("finally")


    async def main() -> None:
        async with await dispatch.start():
            if sys.argv[1] == "submit":
                print("submitted", await waits.dispatch(), flush=True)
                await asyncio.Event().wait()
            assert await dispatch.client.cancel(sys.argv[2])
            try:
                await dispatch.client.result(sys.argv[2], timeout=30)
            except CancelledCallError:
                print("ended cancelled", flush=True)


    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def test_a_call_cancelled_by_a_new_process_cleans_up_there(procs: Starter, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(CANCEL_APP)
    log = tmp_path / "events.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["LEAF_LOG"] = str(log)

    first = procs([PYTHON, str(script), "submit"], cwd=tmp_path, env=env)
    dispatch_id = first.wait_for("^submitted ", timeout=30).split()[1]
    end = time.monotonic() + 30
    while "started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end, first.dump()
        time.sleep(0.02)
    time.sleep(1.5)  # past the live-timer threshold: the call is suspended, in the store
    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait(10)

    second = procs([PYTHON, str(script), "cancel", dispatch_id], cwd=tmp_path, env=env)
    assert second.wait(60) == 0, second.dump()
    assert "ended cancelled" in second.stdout, second.dump()
    events = [line.split() for line in log.read_text().splitlines()]
    # The new interpreter replayed the call and ran its handler and finally, once each.
    assert [(e, int(pid) == second.pid) for e, pid in events] == [
        ("started", False),
        ("started", True),  # the replay runs the body up to the pending await again
        ("cancelled", True),
        ("finally", True),
    ], events
