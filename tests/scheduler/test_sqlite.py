"""The SQLite store: durability settings, schema versions, writes made alone.

The `Store` contract itself is tested on every kind of store in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from dispatch_aio.scheduler import SQLiteStore, StoreError
from dispatch_aio.scheduler.store import (
    WRITE_ALONE,
    WRITE_URGENT,
    AddAttempt,
    AddResult,
    AttemptRecord,
    CallQuery,
    InsertCall,
    Phase,
    PutEvent,
    QueuedResult,
    RemoveResults,
    UpdateCall,
    _sqlite,
)
from dispatch_aio.scheduler.store._sqlite import SCHEMA_VERSION

from .test_store_contract import record


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "calls.db"))
    await s.open()
    yield s
    await s.close()


async def test_durability_settings(store: SQLiteStore, tmp_path: Path) -> None:
    # FULL (2) is not persistent: ask the store's own connection.
    assert await store._run(store._query, "PRAGMA synchronous", ()) == [(2,)]
    assert await store._run(store._query, "PRAGMA journal_mode", ()) == [("wal",)]
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "calls.db")) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(str(path))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        await store.open()


async def test_an_empty_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE unrelated (x)")  # version 0: no schema yet
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await store.write([InsertCall(record("a"))])
        assert (await store.get_call("a")) is not None
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_memory_database() -> None:
    store = SQLiteStore(":memory:")
    await store.open()
    try:
        await store.write([InsertCall(record("a"))])
        assert [c.id for c in (await store.load()).calls] == ["a"]
    finally:
        await store.close()


async def test_unopenable_path_is_reported(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "missing-dir" / "calls.db"))
    with pytest.raises(StoreError, match="cannot open the database"):
        await store.open()


async def yields_to_the_loop(
    write: Awaitable[None], *, alone: bool = False, urgent: bool = False
) -> bool:
    """Await `write` with the WRITE_ALONE and WRITE_URGENT hints; return whether the loop
    got a turn meanwhile."""
    turns: list[int] = []
    asyncio.get_running_loop().call_soon(turns.append, 1)
    tokens = WRITE_ALONE.set(alone), WRITE_URGENT.set(urgent)
    try:
        await write
    finally:
        WRITE_ALONE.reset(tokens[0])
        WRITE_URGENT.reset(tokens[1])
    return bool(turns)


@pytest.fixture
def any_disk_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits count as fast up to 10 s: the tests do not depend on this machine's disk."""
    monkeypatch.setattr(_sqlite, "_INLINE_MAX", 10.0)


@pytest.mark.usefixtures("any_disk_is_fast")
async def test_a_write_made_alone_commits_on_the_loop_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "calls.db")
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await yields_to_the_loop(store.write([InsertCall(record("t"))]), alone=False)
        before = store.commits
        # Alone: committed before `write` returns, without handing it to the writer thread.
        assert not await yields_to_the_loop(store.write([InsertCall(record("a"))]), alone=True)
        assert store.commits == before + 1
        # Atomic as ever: a failing write made alone leaves nothing behind.
        with pytest.raises(StoreError, match="UNIQUE"):
            await yields_to_the_loop(
                store.write([InsertCall(record("b")), InsertCall(record("a"))]), alone=True
            )
        assert await store.get_call("b") is None
    finally:
        await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert [c.id for c in (await reopened.load()).calls] == ["t", "a"]
    finally:
        await reopened.close()


async def until_idle(store: SQLiteStore) -> None:
    """Wait past the time the last commit took: the store is idle again."""
    await asyncio.sleep(max(store._last_commit * 2, 0.01))


@pytest.mark.usefixtures("any_disk_is_fast")
async def test_an_urgent_write_commits_on_the_loop_thread_when_the_store_is_idle(
    store: SQLiteStore,
) -> None:
    await store.write([InsertCall(record("t"))])
    await until_idle(store)
    before = store.commits
    assert not await yields_to_the_loop(store.write([InsertCall(record("a"))]), urgent=True)
    assert store.commits == before + 1
    # Right after that commit the store is not idle: more writes are likely coming.
    assert await yields_to_the_loop(store.write([InsertCall(record("b"))]), urgent=True)
    # Nor is a write of many statements ever urgent: they would hold up the loop.
    await until_idle(store)
    many = [InsertCall(record(f"m{i}")) for i in range(_sqlite._SPLIT_MAX + 1)]
    assert await yields_to_the_loop(store.write(many), urgent=True)
    assert len(await store.list_calls(CallQuery())) == 3 + len(many)


@pytest.mark.usefixtures("any_disk_is_fast")
async def test_urgent_writes_made_together_are_grouped(store: SQLiteStore) -> None:
    await store.write([InsertCall(record("t"))])
    await until_idle(store)

    async def submit(i: int) -> None:
        WRITE_URGENT.set(True)  # this task's own context
        await store.write([InsertCall(record(f"c{i}"))])

    before = store.commits
    await asyncio.gather(*(submit(i) for i in range(20)))
    # The first commits alone on the loop's thread; the others find the store busy and
    # go together, not one commit each.
    assert store.commits - before <= 3
    assert len(await store.list_calls(CallQuery())) == 21


@pytest.mark.usefixtures("any_disk_is_fast")
async def test_a_write_made_alone_joins_queued_writes(store: SQLiteStore) -> None:
    queued = asyncio.ensure_future(store.write([InsertCall(record("q"))]))
    await asyncio.sleep(0)  # the first write is handed to the writer thread
    before = store.commits
    assert await yields_to_the_loop(store.write([InsertCall(record("a"))]), alone=True)
    await queued
    assert {r.id for _, r in await store.list_calls(CallQuery())} == {"q", "a"}
    assert store.commits - before <= 2


@pytest.mark.usefixtures("any_disk_is_fast")
async def test_a_write_made_alone_does_not_wait_for_a_read_on_the_loop(
    store: SQLiteStore,
) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow_read() -> None:  # runs on the writer thread, holding the connection
        started.set()
        release.wait(10)

    reading = asyncio.ensure_future(store._run(slow_read))
    await asyncio.to_thread(started.wait, 10)
    writing = asyncio.ensure_future(
        yields_to_the_loop(store.write([InsertCall(record("a"))]), alone=True)
    )
    await asyncio.sleep(0.05)
    assert not writing.done()  # queued behind the read, and the loop is free meanwhile
    release.set()
    assert await writing
    await reading
    assert await store.get_call("a") is not None


@pytest.mark.usefixtures("any_disk_is_fast")
async def test_writes_go_to_the_writer_thread_after_a_slow_commit(store: SQLiteStore) -> None:
    store._last_commit = 20.0  # as if the disk took 20 s to sync (beyond the 10 s set below)
    assert await yields_to_the_loop(store.write([InsertCall(record("a"))]), alone=True)
    # That commit was fast: the next write made alone stays on the loop's thread again.
    assert not await yields_to_the_loop(store.write([InsertCall(record("b"))]), alone=True)


@contextlib.asynccontextmanager
async def opened_from_version(path: Path, version: int) -> AsyncIterator[SQLiteStore]:
    """Open a store on a database that an older release left at schema `version`."""
    conn = sqlite3.connect(path)
    for migrate in _sqlite._MIGRATIONS[:version]:
        migrate(conn)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


async def test_a_version_4_database_gains_the_policy_column(tmp_path: Path) -> None:
    async with opened_from_version(tmp_path / "old.db", 4) as store:
        await store.write([InsertCall(record("p")._replace(policy=b"\x18\x02"))])
        found = await store.get_call("p")
        assert found is not None and found.policy == b"\x18\x02"


async def test_a_version_5_database_gains_events_and_schedules(tmp_path: Path) -> None:
    async with opened_from_version(tmp_path / "old.db", 5) as store:
        await store.write([PutEvent("k", b"result", 1.0)])
        assert await store.get_events(["k", "other"]) == {"k": b"result"}
        assert await store.list_schedules() == []


async def test_a_version_6_database_gains_the_attempts(tmp_path: Path) -> None:
    async with opened_from_version(tmp_path / "old.db", 6) as store:
        attempt = AttemptRecord("a", 1, 1.0, 2.0, 0, "ok")
        await store.write([InsertCall(record("a")), AddAttempt(attempt)])
        assert await store.list_attempts("a") == [attempt]
        assert await store.get_events(["k"]) == {}


async def test_a_version_7_database_gains_the_trace_context(tmp_path: Path) -> None:
    async with opened_from_version(tmp_path / "old.db", 7) as store:
        traced = record("t")._replace(trace_context='{"traceparent":"00-ab-cd-01"}')
        await store.write([InsertCall(traced)])
        found = await store.get_call("t")
        assert found is not None and found.trace_context == traced.trace_context


async def test_reads_queued_for_the_writer_thread_never_block_a_commit(
    store: SQLiteStore,
) -> None:
    # A read handed to the writer thread may wait there for the connection while the
    # loop applies a write: the loop must never hold the connection across an await then.
    async with asyncio.timeout(30):
        for i in range(200):
            found, _, _ = await asyncio.gather(
                store.get_call(f"c{i - 1}"),  # committed the round before
                store.write([InsertCall(record(f"c{i}"))]),
                store.get_call(f"c{i}"),  # before or after this round's write
            )
            assert i == 0 or found is not None
    assert len(await store.list_calls(CallQuery())) == 200


async def test_unfinished_calls_are_found_by_their_index_whatever_the_history(
    store: SQLiteStore,
) -> None:
    # Listing what is still running (the CLI, the web UI) reads the few unfinished
    # calls, not every top-level call or every call of a tree ever made.
    await store.write(
        [InsertCall(record(f"d{i}", phase=Phase.DONE)) for i in range(50)]
        + [InsertCall(record(f"k{i}", root_id="d0", parent_id="d0")) for i in range(3)]
        + [InsertCall(record("p"))]
    )
    statements: list[str] = []
    assert store._conn is not None
    store._conn.set_trace_callback(statements.append)
    pending = (Phase.PENDING, Phase.SUSPENDED)
    for query in (
        CallQuery(phases=pending, parent_id="", limit=1),
        CallQuery(phases=pending, root_id="d0"),
        CallQuery(phases=pending, parent_id="d0", newest_first=True),
    ):
        statements.clear()
        found = await store.list_calls(query)
        assert found
        [select] = [s for s in statements if s.startswith("SELECT")]
        plan = " ".join(row[3] for row in store._conn.execute(f"EXPLAIN QUERY PLAN {select}"))
        assert "calls_unfinished" in plan, (query, plan)
    store._conn.set_trace_callback(None)


async def test_a_result_delivered_in_the_write_that_queues_it_is_not_written(
    store: SQLiteStore,
) -> None:
    # Each step of a chain queues the child's result and delivers it in one write: the
    # blob would go into the table only to be deleted.
    await store.write([InsertCall(record("p", phase=Phase.SUSPENDED))])
    statements: list[str] = []
    assert store._conn is not None
    store._conn.set_trace_callback(statements.append)
    await store.write(
        [
            UpdateCall(record("p", phase=Phase.SUSPENDED, polls=1)),
            AddResult(QueuedResult(1, "p", 0, b"result")),
            RemoveResults((1,)),
        ]
    )
    store._conn.set_trace_callback(None)
    assert any(s.startswith("UPDATE calls") for s in statements), statements
    assert not any(" results " in s for s in statements), statements
