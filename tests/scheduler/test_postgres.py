"""The PostgreSQL store: schema versions, lost connections, replicas sharing a database."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from dispatch_aio.scheduler import PostgresStore, Scheduler, StoreError
from dispatch_aio.scheduler.store import (
    AddAttempt,
    AddResult,
    AppendSegment,
    AttemptRecord,
    CallQuery,
    InsertCall,
    KeyTakenError,
    Op,
    Phase,
    PutIdempotencyKey,
    QueuedResult,
    RemoveResults,
    RemoveSegments,
    UpdateCall,
    partition_of,
)
from dispatch_aio.scheduler.store._postgres import (
    _ADD_ATTEMPT,
    _ADD_RESULT,
    _MIGRATIONS,
    _REMOVE_RESULTS,
    _UPDATE_CALL,
    SCHEMA_VERSION,
    _arrange,
    _statements,
    mask_url,
)
from dispatch_aio.scheduler.store._rows import CALL_COLUMNS, call_params

from .scripted import ScriptedEndpoint
from .test_store_contract import record
from .test_store_failures import CALLS, finished, gated_calls

MakeScheduler = Callable[..., Awaitable[Scheduler]]


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def admin_url(url: str) -> str:
    """The URL of the server's own database, to act on `url`'s from outside."""
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(admin_url(pg_url))
    yield conn
    await conn.execute(f'ALTER DATABASE "{database_name(pg_url)}" ALLOW_CONNECTIONS true')
    await conn.close()


async def terminate_sessions(admin: asyncpg.Connection, url: str) -> int:
    """End every session on `url`'s database (as a restarted or failed-over server does)."""
    return len(
        await admin.fetch(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database_name(url),
        )
    )


async def test_a_new_database_gets_the_schema_and_its_version(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetch("SELECT version FROM dispatch_schema") == [(SCHEMA_VERSION,)]
    finally:
        await conn.close()
    again = PostgresStore(pg_url)  # opening it again changes nothing
    await again.open()
    await again.close()


async def test_a_newer_schema_is_refused_with_the_versions(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE dispatch_schema SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StoreError) as refused:
        await PostgresStore(pg_url).open()
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}" in message
    assert "upgrade dispatch_aio" in message


async def test_connection_errors_name_the_server_without_the_password() -> None:
    store = PostgresStore("postgresql://alice:s3cret@127.0.0.1:1/calls")
    with pytest.raises(StoreError) as failed:
        await store.open()
    message = str(failed.value)
    assert message.startswith(
        "cannot connect to the database postgresql://alice:***@127.0.0.1:1/calls: "
    )
    assert "s3cret" not in message
    with pytest.raises(StoreError, match="not open"):
        await store.write([InsertCall(record("a"))])


async def test_a_missing_database_says_to_create_it(pg_url: str) -> None:
    url = urlunsplit(urlsplit(pg_url)._replace(path="/no_such_db"))
    with pytest.raises(StoreError, match=r"does not exist; create it \(createdb\)"):
        await PostgresStore(url).open()


def test_urls_are_checked_and_masked() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        PostgresStore("mysql://u:p@h/db")
    assert mask_url("postgresql://u:p@h:5432/db?sslmode=require") == (
        "postgresql://u:***@h:5432/db?sslmode=require"
    )
    assert mask_url("postgres://u@h/db?password=p&x=1") == "postgres://u@h/db?password=***&x=1"
    assert mask_url("postgresql://h/db") == "postgresql://h/db"


def test_the_scheduler_imports_without_asyncpg() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "import asyncio, dispatch_aio.scheduler as s\n"
        "try:\n"
        "    asyncio.run(s.PostgresStore('postgresql://u@h/db').open())\n"
        "except s.StoreError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == (
        "the PostgreSQL store needs the asyncpg package: pip install 'dispatch-aio[postgres]'"
    )


async def test_the_store_connects_again_after_its_session_ended(
    pg_url: str, admin: asyncpg.Connection
) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.write([InsertCall(record("a"))])
        assert await terminate_sessions(admin, pg_url) >= 1
        # Fails if the loss is noticed only by this write, else connects again at once.
        writing = store.write([InsertCall(record("b"))])
        outcome = await asyncio.gather(writing, return_exceptions=True)
        if outcome != [None]:
            assert "lost the connection to postgresql://postgres@/" in str(outcome[0])
            assert await store.get_call("b") is None
        await store.write([InsertCall(record("c"))])
        assert await store.get_call("c") is not None
        other = PostgresStore(pg_url)  # another replica opens the same database
        await other.open()
        try:
            await other.write([InsertCall(record("d"))])
            assert await store.get_call("d") is not None
        finally:
            await other.close()
    finally:
        await store.close()


async def test_a_server_that_accepts_no_writes_is_named_with_what_to_do(
    pg_url: str, admin: asyncpg.Connection
) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    name = database_name(pg_url)
    try:
        await store.write([InsertCall(record("a"))])
        # New sessions are read-only, as on a standby; the store's end and it reconnects.
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await terminate_sessions(admin, pg_url)
        message = ""
        for _ in range(3):  # a first write may only notice that its session ended
            with pytest.raises(StoreError) as caught:
                await store.write([InsertCall(record("b"))])
            message = str(caught.value)
            if "accepts no writes" in message:
                break
        assert "postgresql://postgres@" in message and "accepts no writes" in message, message
        assert "point --database at the primary" in message
        assert await store.get_call("b") is None and await store.get_call("a") is not None
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await store.close()


async def test_calls_move_again_once_the_database_is_back(
    endpoint: ScriptedEndpoint,
    make_scheduler: MakeScheduler,
    pg_url: str,
    admin: asyncpg.Connection,
) -> None:
    s = await make_scheduler(PostgresStore(pg_url))
    gate = asyncio.Event()
    ids = await gated_calls(s, endpoint, gate)
    # The database goes away: its sessions end and no new one is accepted for a while.
    await admin.execute(f'ALTER DATABASE "{database_name(pg_url)}" ALLOW_CONNECTIONS false')
    await terminate_sessions(admin, pg_url)
    gate.set()  # the outcomes arrive while nothing can be written
    await asyncio.sleep(1.0)  # several stalled attempts and re-armed timers
    await admin.execute(f'ALTER DATABASE "{database_name(pg_url)}" ALLOW_CONNECTIONS true')
    assert await finished(s, ids, 10) == [f"{i}!" for i in range(CALLS)]


async def test_a_commit_cut_off_is_read_back_before_its_writers_are_answered(
    pg_url: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    try:
        # A deferred trigger makes each COMMIT take a while: the session ends meanwhile.
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(SLOW_COMMITS)
        finally:
            await conn.close()
        writing = asyncio.ensure_future(store.write([InsertCall(record("a"))]))
        await asyncio.sleep(0.3)
        assert await terminate_sessions(admin, pg_url) >= 1
        with pytest.raises(StoreError, match="lost the connection"):
            await writing
        assert "while committing" in caplog.text
        assert "was not committed" in caplog.text
        assert await store.get_call("a") is None
        await store.write([InsertCall(record("b"))])
        assert await store.get_call("b") is not None
    finally:
        await store.close()


SLOW_COMMITS = """
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON dispatch_calls
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


async def database_at(url: str, version: int) -> None:
    """Give an empty database the schema of `version`, as an older release left it."""
    conn = await asyncpg.connect(url)
    try:
        for step in _MIGRATIONS[:version]:
            await conn.execute(step)
        await conn.execute("CREATE TABLE dispatch_schema (version integer)")
        await conn.execute("INSERT INTO dispatch_schema (version) VALUES ($1)", version)
    finally:
        await conn.close()


async def test_a_version_1_database_is_migrated(pg_url: str) -> None:
    await database_at(pg_url, 1)
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.write([InsertCall(record("x")._replace(divergences=3))])
        found = await store.get_call("x")
        assert found is not None and found.divergences == 3
        assert await store.get_events(["k"]) == {}
        assert await store.list_schedules() == []
        assert await store.list_attempts("x") == []
    finally:
        await store.close()


async def test_a_version_3_database_is_migrated_with_its_queued_results(pg_url: str) -> None:
    await database_at(pg_url, 3)
    store = PostgresStore(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:  # a poller with two results queued, as a scheduler of version 3 left them
        # The columns of version 3: those added later are left out.
        at_v3 = [i for i, c in enumerate(CALL_COLUMNS) if c not in ("policy", "trace_context")]
        columns = ", ".join(CALL_COLUMNS[i] for i in at_v3)
        marks = ", ".join(f"${i}" for i in range(1, len(at_v3) + 1))
        values = call_params(record("poller", phase=Phase.SUSPENDED), lambda text: text)
        params = [values[i] for i in at_v3]
        await conn.execute(f"INSERT INTO dispatch_calls ({columns}) VALUES ({marks})", *params)
        await conn.executemany(
            "INSERT INTO dispatch_results (seq, poller_id, generation, result) "
            "VALUES ($1, 'poller', 0, $2)",
            [(7, b"first"), (9, b"second")],
        )
    finally:
        await conn.close()
    await store.open()
    try:
        partition = partition_of("poller")
        snapshot = await store.coordination().load([partition])
        assert [c.id for c in snapshot.calls] == ["poller"]
        # Renumbered so that seq modulo 64 is the partition, in the same order.
        assert [(r.seq, r.result) for r in snapshot.results] == [
            (7 * 64 + partition, b"first"),
            (9 * 64 + partition, b"second"),
        ]
        assert snapshot.next_seq == 9 * 64 + partition + 1
    finally:
        await store.close()


def test_attempt_rows_go_last_so_that_updates_share_a_round_trip() -> None:
    # Writes committed together each update a call and add its attempt: interleaved, every
    # statement would be its own round trip to the server.
    attempt = AttemptRecord("a", 1, 1.0, 2.0, 0, "ok")
    ops = [
        UpdateCall(record("a")),
        AddAttempt(attempt),
        UpdateCall(record("b")),
        AddAttempt(dataclasses.replace(attempt, call_id="b")),
    ]
    arranged = _arrange([statement for op in ops for statement in _statements(op)])
    assert [sql for sql, _ in arranged] == [_UPDATE_CALL] * 2 + [_ADD_ATTEMPT] * 2
    assert [params[0] for _, params in arranged[2:]] == ["a", "b"]


def test_writes_go_by_table_in_their_order_within_each() -> None:
    # Children finishing together each update their call and queue their result: by
    # table, the updates go in one round trip and the results in another, not one each.
    ops: list[Op] = []
    for child in ("a", "b", "c"):
        ops += [UpdateCall(record(child)), AddResult(QueuedResult(ord(child), "p", 0, b""))]
    ops += [RemoveResults((ord("a"),)), AddResult(QueuedResult(1, "p", 0, b""))]
    arranged = _arrange([statement for op in ops for statement in _statements(op)])
    assert [sql for sql, _ in arranged] == [_UPDATE_CALL] * 3 + [
        _ADD_RESULT,
        _ADD_RESULT,
        _ADD_RESULT,
        _REMOVE_RESULTS,
        _ADD_RESULT,
    ]
    assert [params[0] for _, params in arranged[3:]] == [ord("a"), ord("b"), ord("c"), [97], 1]


class Statements:
    """The statements the store's writing connection sends, counted per write (not
    asyncpg's own queries of the catalog, made once per type it meets)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.sent: list[str] = []
        store._conn.add_query_logger(self._log)

    def _log(self, logged: Any) -> None:
        if "dispatch_" in logged.query or logged.query in ("BEGIN;", "COMMIT;"):
            self.sent.append(logged.query)

    async def write(self, ops: list[Op]) -> int:
        before = len(self.sent)
        await self.store.write(ops)
        return len(self.sent) - before


async def test_a_chain_step_commits_in_one_statement(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    listener = await asyncpg.connect(pg_url)
    done: list[str] = []
    notified = asyncio.Event()

    def heard(*args: object) -> None:
        done.append(str(args[3]))
        notified.set()

    await listener.add_listener("dispatch_done", heard)
    try:
        parent = record("p", phase=Phase.SUSPENDED)
        await store.write(
            [
                InsertCall(parent),
                InsertCall(record("c1", root_id="p", parent_id="p")),
                AddResult(QueuedResult(1, "p", 0, b"r1")),
            ]
        )
        statements = Statements(store)
        # A child's end and its caller's next Poll, as the engine writes them together.
        step: list[Op] = [
            UpdateCall(record("c1", root_id="p", parent_id="p", phase=Phase.DONE, status=1)),
            InsertCall(record("c2", root_id="p", parent_id="p")),
            AppendSegment("p", 1, b"segment 1"),
            UpdateCall(parent._replace(polls=1, attempts=2)),
            AddAttempt(AttemptRecord("c1", 1, 1.0, 2.0, 1, "")),
            AddAttempt(AttemptRecord("p", 2, 1.5, 2.5, 1, "")),
            # The child's result, queued and delivered at once: neither happens.
            AddResult(QueuedResult(2, "p", 0, b"r2")),
            RemoveResults((1, 2)),
        ]
        assert await statements.write(step) == 1, statements.sent
        assert (await store.get_call("c1")).phase is Phase.DONE  # type: ignore[union-attr]
        assert (await store.get_call("p")).polls == 1  # type: ignore[union-attr]
        assert await store.get_call("c2") is not None
        assert await store.read_segments("p") == [b"segment 1"]
        assert [a.number for a in await store.list_attempts("p")] == [2]
        assert [a.number for a in await store.list_attempts("c1")] == [1]
        assert (await store.load()).results == []
        async with asyncio.timeout(5):
            await notified.wait()
        assert done == ["c1"]  # notified at the commit, as from a transaction
    finally:
        await listener.close()
        await store.close()


async def test_writes_that_change_a_row_twice_go_statement_by_statement(pg_url: str) -> None:
    # In one statement an update would not see the row inserted by its neighbour, nor a
    # removal the segment appended: such writes keep the order of their operations.
    store = PostgresStore(pg_url)
    await store.open()
    try:
        statements = Statements(store)
        suspended = record("a", phase=Phase.SUSPENDED)
        assert await statements.write([InsertCall(record("a")), UpdateCall(suspended)]) > 1
        assert (await store.get_call("a")).phase is Phase.SUSPENDED  # type: ignore[union-attr]
        ops: list[Op] = [AppendSegment("a", 1, b"s"), RemoveSegments("a")]
        assert await statements.write(ops) > 1
        assert await store.read_segments("a") == []
        added = [RemoveResults((7,)), AddResult(QueuedResult(7, "a", 0, b"r"))]
        assert await statements.write(added) > 1
        assert [r.seq for r in (await store.load()).results] == [7]
        # Calls inserted together keep their order (their seq): one statement would not.
        ops = [InsertCall(record(f"k{i}")) for i in range(3)]
        assert await statements.write(ops) > 1
        listed = [rec.id for _, rec in await store.list_calls(CallQuery())]
        assert listed == ["a", "k0", "k1", "k2"]
    finally:
        await store.close()


async def test_a_submission_commits_in_one_statement_and_a_taken_key_in_none(
    pg_url: str,
) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    try:
        statements = Statements(store)
        far = time.time() + 3600
        submitted: list[Op] = [InsertCall(record("a")), PutIdempotencyKey("k", "a", far)]
        assert await statements.write(submitted) == 1
        with pytest.raises(KeyTakenError):
            await statements.write([InsertCall(record("b")), PutIdempotencyKey("k", "b", far)])
        assert await store.get_call("b") is None
        assert await store.find_idempotency_keys(["k"], time.time()) == {"k": "a"}
    finally:
        await store.close()
