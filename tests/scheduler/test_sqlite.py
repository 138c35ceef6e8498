"""The SQLite store: records, queues, atomic and batched writes, schema versions, locking."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from dispatch_aio.scheduler import SQLiteStore, StoreError, _sqlite
from dispatch_aio.scheduler._sqlite import SCHEMA_VERSION
from dispatch_aio.scheduler._store import (
    WRITE_ALONE,
    AddResult,
    CallQuery,
    CallRecord,
    InsertCall,
    Phase,
    QueuedResult,
    RemovePollerResults,
    RemoveResults,
    SetMeta,
    StateKind,
    UpdateCall,
)


def record(dispatch_id: str, **kw: object) -> CallRecord:
    fields: dict[str, object] = {
        "id": dispatch_id,
        "root_id": dispatch_id,
        "parent_id": "",
        "correlation_id": 0,
        "parent_generation": 0,
        "endpoint": "http://127.0.0.1:1",
        "function": "f",
        "input": b"in",
        "version": "",
        "created_at": 1.5,
        "expires_at": 100.25,
        "phase": Phase.PENDING,
        "updated_at": 2.0,
    }
    fields.update(kw)
    return CallRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "calls.db"))
    await s.open()
    yield s
    await s.close()


async def test_records_round_trip(store: SQLiteStore) -> None:
    full = record(
        "a",
        correlation_id=2**64 - 1,
        phase=Phase.SUSPENDED,
        due_at=7.5,
        state_kind=StateKind.TYPED,
        state=b"\x00state",
        min_results=3,
        max_results=9,
        poll_error=b"err",
        attempts=4,
        failures=1,
        polls=2,
        status=6,
        last_error="HTTP 503",
        generation=3,
    )
    await store.write([InsertCall(full)])
    assert await store.get_call("a") == full
    done = dataclasses.replace(full, phase=Phase.DONE, result=b"res", finished_at=9.0, status=1)
    await store.write([UpdateCall(done)])
    assert await store.get_call("a") == done
    assert await store.get_call("missing") is None


async def test_load_returns_unfinished_calls_and_their_queues(store: SQLiteStore) -> None:
    await store.write(
        [
            InsertCall(record("p", phase=Phase.SUSPENDED)),
            InsertCall(record("c1", root_id="p", parent_id="p", phase=Phase.DONE)),
            InsertCall(record("c2", root_id="p", parent_id="p")),
            AddResult(QueuedResult(5, "p", 0, b"r5")),
            AddResult(QueuedResult(3, "p", 0, b"r3")),
        ]
    )
    snapshot = await store.load()
    assert [c.id for c in snapshot.calls] == ["p", "c2"]
    assert [(r.seq, r.result) for r in snapshot.results] == [(3, b"r3"), (5, b"r5")]
    assert snapshot.next_seq == 6
    await store.write([RemoveResults((3,))])
    assert [r.seq for r in (await store.load()).results] == [5]
    await store.write([RemovePollerResults("p")])
    snapshot = await store.load()
    assert snapshot.results == []
    assert snapshot.next_seq == 1


async def test_list_calls_filters_and_pages(store: SQLiteStore) -> None:
    await store.write(
        [
            InsertCall(record("r1", phase=Phase.DONE, status=1)),
            InsertCall(record("k1", root_id="r1", parent_id="r1", phase=Phase.DONE, status=7)),
            InsertCall(record("k2", root_id="r1", parent_id="r1", phase=Phase.SUSPENDED)),
            InsertCall(record("r2")),
        ]
    )

    async def ids(**kw: object) -> list[str]:
        return [rec.id for _, rec in await store.list_calls(CallQuery(**kw))]  # type: ignore[arg-type]

    assert await ids() == ["r1", "k1", "k2", "r2"]
    assert await ids(parent_id="") == ["r1", "r2"]
    assert await ids(root_id="r1") == ["r1", "k1", "k2"]
    assert await ids(phases=(Phase.PENDING, Phase.SUSPENDED)) == ["k2", "r2"]
    assert await ids(statuses=(7,)) == ["k1"]
    first = await store.list_calls(CallQuery(limit=2))
    assert [r.id for _, r in first] == ["r1", "k1"]
    assert await ids(after=first[-1][0]) == ["k2", "r2"]
    assert await store.count_children(["r1", "r2", "k1"]) == {"r1": 2}


async def test_a_write_is_atomic(store: SQLiteStore) -> None:
    await store.write([InsertCall(record("a"))])
    with pytest.raises(StoreError, match="UNIQUE"):
        await store.write([InsertCall(record("b")), InsertCall(record("a"))])
    assert await store.get_call("b") is None


async def test_concurrent_writes_share_commits_and_fail_alone(store: SQLiteStore) -> None:
    await store.write([InsertCall(record("dup"))])
    before = store.commits
    writes = [store.write([InsertCall(record(f"c{i}"))]) for i in range(200)]
    writes.insert(100, store.write([InsertCall(record("dup"))]))
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert isinstance(outcomes[100], StoreError)
    assert [o for i, o in enumerate(outcomes) if i != 100] == [None] * 200
    assert len(await store.list_calls(CallQuery())) == 201
    # 200 writes issued together: grouped into a handful of transactions.
    assert store.commits - before < 10


async def test_meta_values(store: SQLiteStore) -> None:
    assert await store.get_meta("k") is None
    await store.write([SetMeta("k", b"v1")])
    await store.write([SetMeta("k", b"v2")])
    assert await store.get_meta("k") == b"v2"


async def test_durability_settings(store: SQLiteStore, tmp_path: Path) -> None:
    # FULL (2) is not persistent: ask the store's own connection.
    assert await store._run(store._query, "PRAGMA synchronous", ()) == [(2,)]
    assert await store._run(store._query, "PRAGMA journal_mode", ()) == [("wal",)]
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "calls.db")) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_data_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "calls.db")
    first = SQLiteStore(path)
    await first.open()
    await first.write([InsertCall(record("a")), AddResult(QueuedResult(1, "a", 0, b"r"))])
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        snapshot = await second.load()
        assert [c.id for c in snapshot.calls] == ["a"]
        assert [r.result for r in snapshot.results] == [b"r"]
    finally:
        await second.close()


async def test_a_second_scheduler_cannot_open_the_same_database(
    store: SQLiteStore, tmp_path: Path
) -> None:
    other = SQLiteStore(str(tmp_path / "calls.db"))
    with pytest.raises(StoreError, match="in use by another process"):
        await other.open()


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


async def test_writing_to_a_closed_store_fails(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "calls.db"))
    with pytest.raises(StoreError, match="not open"):
        await store.write([InsertCall(record("a"))])


async def yields_to_the_loop(write: Awaitable[None], *, alone: bool) -> bool:
    """Await `write` with the WRITE_ALONE hint; return whether the loop got a turn meanwhile."""
    turns: list[int] = []
    asyncio.get_running_loop().call_soon(turns.append, 1)
    token = WRITE_ALONE.set(alone)
    try:
        await write
    finally:
        WRITE_ALONE.reset(token)
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
