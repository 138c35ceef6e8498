"""A result nobody waits for yet commits with the next write instead of alone.

Calls submitted one after the other then cost one commit each: the submission's,
which carries the result of the call before. Such a write still commits within
`DEFER_MAX` when no other write comes, and a call with a waiter is never held back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dispatch_aio.scheduler import Scheduler, SQLiteStore
from dispatch_aio.scheduler.store import DEFER_MAX, WRITE_DEFERRABLE, Op, Phase

from .scripted import ScriptedEndpoint, call, ok, unpack_text

MakeScheduler = Callable[..., Awaitable[Scheduler]]


class CountingStore(SQLiteStore):
    """A real SQLite store that counts its transactions and the writes they carry."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.transactions: list[int] = []  # writes per transaction
        self.deferred = asyncio.Event()  # set when a deferrable write is handed over

    async def write(self, ops: Sequence[Op]) -> None:
        if WRITE_DEFERRABLE.get():
            self.deferred.set()
        await super().write(ops)

    def _apply(self, conn: Any, groups: list[Any]) -> Any:  # once per transaction
        self.transactions.append(len(groups))
        return super()._apply(conn, groups)


async def test_calls_submitted_one_by_one_commit_once_each(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = CountingStore(str(tmp_path / "scheduler.db"))
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    endpoint.on("echo", lambda req: ok(unpack_text(req.input)))
    before = len(store.transactions)
    ids = []
    for i in range(50):
        store.deferred.clear()
        [dispatch_id] = await s.dispatch([call("echo", str(i))])
        ids.append(dispatch_id)
        # The call runs and its result is handed to the store before the next
        # submission (waiting on the store, not on a clock: CI machines are slow).
        async with asyncio.timeout(5):
            await store.deferred.wait()
    async with asyncio.timeout(5):
        results = [await s.wait(i) for i in ids]
    assert [unpack_text(r.output) for r in results] == [str(i) for i in range(50)]
    made = store.transactions[before:]
    # 50 submissions and 50 results in about 50 transactions, not 100: each result
    # went with the next submission (one may commit alone now and then, on a loaded
    # machine, when its deferral of DEFER_MAX ends before the next submission).
    assert sum(made) == 100
    assert len(made) <= 75, made


async def test_a_result_nobody_asks_for_is_committed_within_the_deferral(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = CountingStore(str(tmp_path / "scheduler.db"))
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    endpoint.on("echo", lambda req: ok(unpack_text(req.input)))
    [dispatch_id] = await s.dispatch([call("echo", "x")])
    await endpoint.wait_for(lambda: len(endpoint.requests_for("echo")) == 1)
    async with asyncio.timeout(5):  # no waiter, no other write: it commits on its own
        while (rec := await store.get_call(dispatch_id)) is None or rec.phase is not Phase.DONE:  # noqa: ASYNC110 - a committed row, no event
            await asyncio.sleep(DEFER_MAX / 5)
    assert unpack_text((await s.wait(dispatch_id)).output) == "x"


async def test_a_deferred_result_is_committed_when_the_store_closes(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    path = str(tmp_path / "scheduler.db")
    store = CountingStore(path)
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    endpoint.on("echo", lambda req: ok(unpack_text(req.input)))
    [dispatch_id] = await s.dispatch([call("echo", "x")])
    async with asyncio.timeout(5):
        await store.deferred.wait()
    await s.close()  # within the deferral
    again = SQLiteStore(path)
    await again.open()
    try:
        rec = await again.get_call(dispatch_id)
    finally:
        await again.close()
    assert rec is not None
    assert rec.phase is Phase.DONE
