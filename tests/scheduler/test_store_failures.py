"""A failed database write never strands a call: it moves once the store works again."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.scheduler import Scheduler, SQLiteStore, StoreError
from dispatch_aio.scheduler.store import Op

from .scripted import ScriptedEndpoint, call, ok, unpack_text

MakeScheduler = Callable[..., Awaitable[Scheduler]]
CALLS = 5


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[bool]:
    """Mount a tmpfs of `size` on `folder`; yield whether it could be mounted."""
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; return it."""
    filler = folder / "filler"
    # Unbuffered: nothing is left to flush, and fail again, when the file is closed.
    with open(filler, "wb", buffering=0) as out, pytest.raises(OSError) as full:  # noqa: PT012
        while True:
            out.write(b"\0" * 65536)
    assert full.value.errno == errno.ENOSPC
    return filler


class FailingStore(SQLiteStore):
    """A real SQLite store whose writes fail while `failing` is set (disk full, locked)."""

    failing = False

    async def write(self, ops: Sequence[Op]) -> None:
        if self.failing:
            raise StoreError("the database write failed: database is locked")
        await super().write(ops)


async def gated_calls(s: Scheduler, endpoint: ScriptedEndpoint, gate: asyncio.Event) -> list[str]:
    async def answer(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        await gate.wait()
        return ok(unpack_text(req.input) + "!")

    endpoint.on("echo", answer)
    ids = await s.dispatch([call("echo", str(i), endpoint=endpoint.url) for i in range(CALLS)])
    await endpoint.wait_for(lambda: len(endpoint.requests_for("echo")) >= CALLS)
    return ids


async def finished(s: Scheduler, ids: list[str], seconds: float) -> list[str]:
    async with asyncio.timeout(seconds):
        results = [await s.wait(i) for i in ids]
    return [unpack_text(r.output) for r in results]


async def test_calls_move_again_once_a_full_disk_has_room(
    endpoint: ScriptedEndpoint,
    make_scheduler: MakeScheduler,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with small_disk(tmp_path / "disk") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here; the injected failure test covers it")
        db = tmp_path / "disk" / "scheduler.db"
        s = await make_scheduler(str(db))
        gate = asyncio.Event()
        ids = await gated_calls(s, endpoint, gate)
        filler = fill(tmp_path / "disk")
        gate.set()  # the outcomes arrive while nothing can be written
        await asyncio.sleep(1.0)  # several stalled attempts and re-armed timers
        os.unlink(filler)
        assert await finished(s, ids, 10) == [f"{i}!" for i in range(CALLS)]
    # Each stall is one line that names the database and what to do, no traceback.
    stalls = [r for r in caplog.records if "was not recorded" in r.getMessage()]
    assert stalls
    for stall in stalls:
        assert stall.exc_info is None
        assert f"cannot write to the database {str(db)!r}: its disk is full" in stall.getMessage()


async def test_calls_move_again_once_a_locked_database_is_free(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = FailingStore(str(tmp_path / "scheduler.db"))
    s = await make_scheduler(store)
    gate = asyncio.Event()
    ids = await gated_calls(s, endpoint, gate)
    store.failing = True
    gate.set()
    await asyncio.sleep(1.0)
    store.failing = False
    assert await finished(s, ids, 10) == [f"{i}!" for i in range(CALLS)]
