"""SQLite implementation of the scheduler's `Store`.

One connection, in WAL mode with `synchronous=FULL` and an exclusive lock so that two
schedulers never share a database. It is used on a writer thread (a single-thread
executor), so that the event loop runs on while a transaction commits. Writes of
concurrent operations are grouped: while a transaction commits, new writes queue up,
and the next transaction takes all of them; each caller is answered once its
transaction has committed.

A write the engine makes with nothing else in flight (`WRITE_ALONE`) is committed on
the event loop's thread instead, when the writer thread is idle and commits are fast:
the loop would only wait for it, and the two thread hand-offs cost about as much as a
small commit. Another small transaction is applied on the loop's thread as well, and
only its COMMIT, which waits for the disk with the interpreter lock released, goes to
the writer thread: the loop waits until the writer thread has begun it, so that the
disk works while the loop goes on (a thread left to wait for the interpreter lock
behind a busy loop would begin only once the loop next idles). A lock keeps the
connection to one thread at a time.

A small write a client waits for from another process (`WRITE_URGENT`, a submission
through the API) is committed on the loop's thread too, though attempts may be in
flight, when the store is idle: no write committing, and none committed within the time
the last commit took. A client that submits one call after another then waits for one
commit and no hand-off; writes that come in a burst (many clients) find the store busy
and are grouped as usual.

A write nobody waits for yet (`WRITE_DEFERRABLE`) waits in the queue, up to
`DEFER_MAX`, for another write to start a transaction: submissions made one after the
other then commit with the result of the call before, one commit each instead of two.

The schema version is kept in `PRAGMA user_version`; `_MIGRATIONS[n]` upgrades a
database from version n to n + 1, so older databases are migrated on open and newer
ones are refused.

The database holds the scheduler's signing key, so its files (the database, its ``-wal``
and ``-shm``, and the mark below) are made readable by their owner only (0600), also
when they exist with looser modes.

Damage is detected at open, before anything is acted on: ``PRAGMA quick_check`` must
pass, and every transaction counts itself in the database and then in a mark file beside
it (``<database>.mark``, written without fsync: it may lag behind the database after a
power loss, never run ahead of it). A database that has fewer transactions than its mark
lost committed work (a deleted or truncated WAL, an emptied or replaced file): the store
refuses to open it rather than run calls already finished again, or drop accepted ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ._interface import (
    DEFER_MAX,
    WRITE_ALONE,
    WRITE_DEFERRABLE,
    WRITE_URGENT,
    AddAttempt,
    AddResult,
    Announce,
    AppendSegment,
    AttemptRecord,
    CallQuery,
    CallRecord,
    DeleteSchedule,
    Fence,
    InsertCall,
    KeyTakenError,
    MoveSchedule,
    Op,
    Phase,
    PruneIdempotencyKeys,
    PutEvent,
    PutIdempotencyKey,
    PutSchedule,
    QueuedResult,
    RemovePollerResults,
    RemoveResults,
    RemoveSegments,
    ScheduleRecord,
    SetMeta,
    Snapshot,
    Store,
    StoreError,
    StoreInUseError,
    UpdateCall,
    answer_writers,
    without_delivered,
)
from ._rows import (
    CALL_COLUMNS,
    MUTABLE_AT,
    MUTABLE_COLUMNS,
    call_from_row,
    signed,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

logger = logging.getLogger("dispatch_aio.scheduler")

T = TypeVar("T")

SCHEMA_VERSION = 8
"""Version of the schema this module writes (PRAGMA user_version)."""

_SCHEMA_V1 = """
CREATE TABLE calls (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    root_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    correlation_id INTEGER NOT NULL,
    parent_generation INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    function TEXT NOT NULL,
    input BLOB NOT NULL,
    version TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    phase INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    generation INTEGER NOT NULL,
    due_at REAL,
    state_kind INTEGER NOT NULL,
    state BLOB NOT NULL,
    min_results INTEGER NOT NULL,
    max_results INTEGER NOT NULL,
    poll_error BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    polls INTEGER NOT NULL,
    status INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    result BLOB NOT NULL,
    finished_at REAL
);
CREATE INDEX calls_unfinished ON calls (phase) WHERE phase != 4;
CREATE INDEX calls_root ON calls (root_id);
CREATE INDEX calls_parent ON calls (parent_id);
CREATE TABLE results (
    seq INTEGER PRIMARY KEY,
    poller_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    result BLOB NOT NULL
);
CREATE INDEX results_poller ON results (poller_id);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    # Statement by statement: executescript() would commit the migration's transaction.
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


# Version 2: journals kept by the scheduler (StateKind.SEGMENTS), one row per round, so
# that a round appends a row instead of rewriting the whole journal.
_SCHEMA_V2 = """
CREATE TABLE segments (
    call_id TEXT NOT NULL,
    polls INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX segments_call ON segments (call_id, polls)
"""


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V2.split(";"):
        if statement.strip():
            conn.execute(statement)


# Version 3: how many runs of each call diverged from their journal, for `calls`/`show`.
def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE calls ADD COLUMN divergences INTEGER NOT NULL DEFAULT 0")


# Version 4: idempotency keys of submissions, kept for a retention period.
def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, dispatch_id TEXT NOT NULL, "
        "expires_at REAL NOT NULL)"
    )
    conn.execute("CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at)")


# Version 5: the policy each call carries (retries, attempt timeout, concurrency, rate).
def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE calls ADD COLUMN policy BLOB NOT NULL DEFAULT x''")


# Version 6: durable events (resolved once, by key) and schedules.
def _migrate_5_to_6(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE events (key TEXT PRIMARY KEY, result BLOB NOT NULL, "
        "resolved_at REAL NOT NULL)"
    )
    conn.execute(
        "CREATE TABLE schedules (id TEXT PRIMARY KEY, spec BLOB NOT NULL, "
        "next_at REAL NOT NULL, paused INTEGER NOT NULL, created_at REAL NOT NULL)"
    )


# Version 7: each attempt of a call, with its outcome and time, for `show`.
def _migrate_6_to_7(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE attempts (call_id TEXT NOT NULL, number INTEGER NOT NULL, "
        "started_at REAL NOT NULL, finished_at REAL NOT NULL, status INTEGER NOT NULL, "
        "outcome TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX attempts_call ON attempts (call_id, number)")


# Version 8: the trace context each call was made in.
def _migrate_7_to_8(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE calls ADD COLUMN trace_context TEXT NOT NULL DEFAULT ''")


_COMMITS_KEY = "store.commits"  # meta row counting the transactions committed
_COUNT_COMMIT = f"UPDATE meta SET value = value + 1 WHERE key = '{_COMMITS_KEY}'"
_FILE_MODE = 0o600

_INLINE_MAX = 0.002  # seconds: a slower last commit sends writes to the writer thread
# Statements: a larger transaction is applied on the writer thread, whose statements
# run mostly without the interpreter lock, leaving the loop's thread to the rest.
_SPLIT_MAX = 16
_HANDOVER_MAX = 0.0002  # seconds the loop waits at most for the writer thread to begin

_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_0_to_1,
    _migrate_1_to_2,
    _migrate_2_to_3,
    _migrate_3_to_4,
    _migrate_4_to_5,
    _migrate_5_to_6,
    _migrate_6_to_7,
    _migrate_7_to_8,
)

_COLUMNS = ", ".join(CALL_COLUMNS)
_INSERT_CALL = f"INSERT INTO calls ({_COLUMNS}) VALUES ({', '.join('?' * len(CALL_COLUMNS))})"
_UPDATE_CALL = f"UPDATE calls SET {', '.join(f'{c} = ?' for c in MUTABLE_COLUMNS)} WHERE id = ?"
_ADD_RESULT = "INSERT INTO results (seq, poller_id, generation, result) VALUES (?, ?, ?, ?)"
_REMOVE_RESULT = "DELETE FROM results WHERE seq = ?"
_ADD_ATTEMPT = (
    "INSERT INTO attempts (call_id, number, started_at, finished_at, status, outcome) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_SELECT_ATTEMPTS = (
    "SELECT call_id, number, started_at, finished_at, status, outcome FROM attempts "
    "WHERE call_id = ? ORDER BY number, rowid"
)
_REMOVE_POLLER_RESULTS = "DELETE FROM results WHERE poller_id = ?"
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_KEEP_META = "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)"
_SELECT_CALLS = f"SELECT seq, {_COLUMNS} FROM calls"
_APPEND_SEGMENT = "INSERT INTO segments (call_id, polls, data) VALUES (?, ?, ?)"
_REMOVE_SEGMENTS = "DELETE FROM segments WHERE call_id = ?"
# Changes no row when the key is live for another call: `_execute` refuses the write then.
_PUT_KEY = (
    "INSERT INTO idempotency_keys (key, dispatch_id, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET dispatch_id = excluded.dispatch_id, "
    "expires_at = excluded.expires_at WHERE idempotency_keys.dispatch_id = excluded.dispatch_id "
    "OR idempotency_keys.expires_at < ?"
)
_PRUNE_KEYS = "DELETE FROM idempotency_keys WHERE expires_at < ?"
_SELECT_SEGMENTS = "SELECT data FROM segments WHERE call_id = ? ORDER BY polls"
# A plain INSERT: a key resolved already fails the whole write.
_PUT_EVENT = "INSERT INTO events (key, result, resolved_at) VALUES (?, ?, ?)"
_PUT_SCHEDULE = (
    "INSERT OR REPLACE INTO schedules (id, spec, next_at, paused, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
_MOVE_SCHEDULE = "UPDATE schedules SET next_at = max(next_at, ?) WHERE id = ?"
_DELETE_SCHEDULE = "DELETE FROM schedules WHERE id = ?"

_Statement = tuple[str, tuple[Any, ...]]


# The record's fields are the table's columns, in order (`CALL_COLUMNS`); its enums
# bind as integers.
_MUTABLE = operator.itemgetter(*MUTABLE_AT)


def _insert_params(r: CallRecord) -> tuple[Any, ...]:
    if r.correlation_id < 1 << 63:
        return r
    return r._replace(correlation_id=signed(r.correlation_id))


def _update_params(r: CallRecord) -> tuple[Any, ...]:
    return (*_MUTABLE(r), r.id)


def _statements(op: Op) -> list[_Statement]:
    match op:  # the ops of every attempt first
        case UpdateCall(record):
            return [(_UPDATE_CALL, _update_params(record))]
        case AddAttempt(a):
            row = (a.call_id, a.number, a.started_at, a.finished_at, a.status, a.outcome)
            return [(_ADD_ATTEMPT, row)]
        case InsertCall(record):
            return [(_INSERT_CALL, _insert_params(record))]
        case AddResult(q):
            return [(_ADD_RESULT, (q.seq, q.poller_id, q.generation, q.result))]
        case RemoveResults(seqs):
            return [(_REMOVE_RESULT, (s,)) for s in seqs]
        case RemovePollerResults(poller_id):
            return [(_REMOVE_POLLER_RESULTS, (poller_id,))]
        case AppendSegment(call_id, polls, data):
            return [(_APPEND_SEGMENT, (call_id, polls, data))]
        case RemoveSegments(call_id):
            return [(_REMOVE_SEGMENTS, (call_id,))]
        case SetMeta(key, value, keep):
            return [(_KEEP_META if keep else _SET_META, (key, value))]
        case PutIdempotencyKey(key, dispatch_id, expires_at, now):
            return [(_PUT_KEY, (key, dispatch_id, expires_at, time.time() if now is None else now))]
        case PruneIdempotencyKeys(before):
            return [(_PRUNE_KEYS, (before,))]
        case Fence() | Announce():
            return []  # one scheduler drives the file: nothing to fence nor to wake
        case PutEvent(key, result, resolved_at):
            return [(_PUT_EVENT, (key, result, resolved_at))]
        case PutSchedule(r):
            return [(_PUT_SCHEDULE, (r.id, r.spec, r.next_at, int(r.paused), r.created_at))]
        case MoveSchedule(schedule_id, next_at):
            return [(_MOVE_SCHEDULE, (next_at, schedule_id))]
        case DeleteSchedule(schedule_id):
            return [(_DELETE_SCHEDULE, (schedule_id,))]


class _KeyTaken(sqlite3.IntegrityError):
    """A `PutIdempotencyKey` met the live key of another call (`StoreError`: KeyTakenError)."""


def _execute(conn: sqlite3.Connection, statements: list[_Statement]) -> None:
    # Consecutive statements with the same SQL go through one executemany.
    i = 0
    while i < len(statements):
        sql = statements[i][0]
        if sql is _PUT_KEY:
            params = statements[i][1]
            if conn.execute(sql, params).rowcount == 0:
                raise _KeyTaken(f"idempotency key {params[0]} is held by another call")
            i += 1
            continue
        j = i + 1
        while j < len(statements) and statements[j][0] == sql:
            j += 1
        if j - i == 1:
            conn.execute(sql, statements[i][1])
        else:
            conn.executemany(sql, [params for _, params in statements[i:j]])
        i = j


class SQLiteStore(Store):
    """The default `Store`: a SQLite database file, or ``":memory:"``.

    Args:
        path: Database file (created if missing), or ``":memory:"`` for a database
            that lives as long as the store is open.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        # Writes waiting for the next transaction: statements, caller, deferrable.
        self._pending: list[tuple[list[_Statement], asyncio.Future[None], bool]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._deferred: asyncio.TimerHandle | None = None  # starts a flush of deferred writes
        self._commits = 0
        self._conn_lock = threading.Lock()  # held by whichever thread uses the connection
        self._jobs = 0  # jobs handed to the writer thread whose futures are not done
        self._last_commit = 0.0  # seconds the last transaction took
        self._last_end = 0.0  # when it committed (time.perf_counter())
        self._counted = 0  # transactions the database holds, as of the last commit
        self._mark: int | None = None  # file descriptor of the mark file

    @property
    def path(self) -> str:
        """The database path given to the constructor."""
        return self._path

    @property
    def commits(self) -> int:
        """Number of write transactions committed so far (to observe batching)."""
        return self._commits

    async def open(self) -> None:
        """Open the database on the writer thread, creating or migrating its schema.

        Raises:
            StoreError: The file cannot be opened, is locked by another process, or
                was written by a newer version.
        """
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatch-aio-db")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        """Commit pending writes and close the connection and the writer thread."""
        if self._executor is None:
            return
        if self._pending and self._flusher is None:
            self._start_flush()  # deferred writes
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        try:
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def write(self, ops: Sequence[Op]) -> None:
        """Apply `ops` in one transaction shared with concurrent writes.

        Raises:
            StoreError: The transaction failed; none of `ops` was applied.
        """
        if self._executor is None:
            raise StoreError("the store is not open")
        statements = [s for op in without_delivered(ops) for s in _statements(op)]
        if not statements:
            return
        deferrable = WRITE_DEFERRABLE.get()
        # Urgent and small only: the statements of a large write would hold up the loop.
        urgent = WRITE_URGENT.get() and len(statements) <= _SPLIT_MAX and self._idle()
        if (
            (WRITE_ALONE.get() or urgent)
            and not deferrable
            and self._flusher is None  # no write committing (deferred ones may wait)
            and self._last_commit < _INLINE_MAX
            and self._conn_lock.acquire(blocking=False)  # no read running either
        ):
            # The deferred writes waiting go first, in the same transaction.
            waiting = self._take_pending()
            try:
                errors = self._commit_sync([*(s for s, _, _ in waiting), statements])
            finally:
                self._conn_lock.release()
            *theirs, error = errors
            answer_writers([f for _, f, _ in waiting], theirs)
            if error is not None:
                raise error
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((statements, future, deferrable))
        if self._flusher is None:
            if not deferrable:
                self._start_flush()
            elif self._deferred is None:
                self._deferred = loop.call_later(DEFER_MAX, self._start_flush)
        await future

    def _idle(self) -> bool:
        """Whether no write committed within the time the last commit took.

        After a write committed just now, more are likely coming (many clients): they
        had better be grouped than committed one by one on the loop's thread.
        """
        return time.perf_counter() - self._last_end >= self._last_commit

    def _start_flush(self) -> None:
        self._deferred = None
        if self._flusher is None and self._pending:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def _take_pending(self) -> list[tuple[list[_Statement], asyncio.Future[None], bool]]:
        batch, self._pending = self._pending, []
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        return batch

    async def load(self) -> Snapshot:
        """Return every unfinished call and the results queued for them."""
        return await self._run(self._load_sync)

    async def get_call(self, dispatch_id: str) -> CallRecord | None:
        """Return a call by dispatch id, or None."""
        rows = await self._run(self._query, f"{_SELECT_CALLS} WHERE id = ?", (dispatch_id,))
        return call_from_row(rows[0])[1] if rows else None

    async def list_calls(self, query: CallQuery) -> list[tuple[int, CallRecord]]:
        """Return the calls matching `query` in creation order (or the newest first)."""
        where = ["seq > ?"]
        params: list[Any] = [query.after]
        if query.before:
            where.append("seq < ?")
            params.append(query.before)
        # Unfinished calls are few next to the history: when only they are asked for,
        # their index serves, and SQLite is told so (it does not infer the index's
        # condition from the list of phases, and would walk a tree's or all top-level
        # calls instead).
        unfinished = bool(query.phases) and Phase.DONE not in query.phases
        if query.phases:
            where.append(f"phase IN ({', '.join('?' * len(query.phases))})")
            params.extend(int(p) for p in query.phases)
            if unfinished:
                where.append("phase != 4")
        if query.statuses:
            where.append(f"phase = 4 AND status IN ({', '.join('?' * len(query.statuses))})")
            params.extend(query.statuses)
        if query.root_id:
            where.append("+root_id = ?" if unfinished else "root_id = ?")
            params.append(query.root_id)
        if query.parent_id is not None:
            where.append("+parent_id = ?" if unfinished else "parent_id = ?")
            params.append(query.parent_id)
        order = "seq DESC" if query.newest_first else "seq"
        sql = f"{_SELECT_CALLS} WHERE {' AND '.join(where)} ORDER BY {order}"
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        rows = await self._run(self._query, sql, tuple(params))
        return [call_from_row(row) for row in rows]

    async def count_children(self, dispatch_ids: Sequence[str]) -> dict[str, int]:
        """Return how many direct children each of `dispatch_ids` has."""
        if not dispatch_ids:
            return {}
        sql = (
            "SELECT parent_id, count(*) FROM calls "
            f"WHERE parent_id IN ({', '.join('?' * len(dispatch_ids))}) GROUP BY parent_id"
        )
        rows = await self._run(self._query, sql, tuple(dispatch_ids))
        return {parent: count for parent, count in rows}

    async def get_meta(self, key: str) -> bytes | None:
        """Return a value stored with `SetMeta`, or None."""
        rows = await self._run(self._query, "SELECT value FROM meta WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    async def find_idempotency_keys(self, keys: Sequence[str], now: float) -> dict[str, str]:
        """Return the dispatch id of each of `keys` stored and not expired at `now`."""
        if not keys:
            return {}
        sql = (
            "SELECT key, dispatch_id FROM idempotency_keys "
            f"WHERE key IN ({', '.join('?' * len(keys))}) AND expires_at >= ?"
        )
        rows = await self._run(self._query, sql, (*keys, now))
        return {key: dispatch_id for key, dispatch_id in rows}

    @property
    def keeps_events(self) -> bool:
        """True: events and schedules have tables of their own (schema version 5)."""
        return True

    async def get_events(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Return the outcome of each of `keys` resolved."""
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):  # under SQLite's limit of parameters
            chunk = keys[start : start + 500]
            sql = f"SELECT key, result FROM events WHERE key IN ({', '.join('?' * len(chunk))})"
            rows = await self._run(self._query, sql, tuple(chunk))
            found.update((key, bytes(result)) for key, result in rows)
        return found

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Return every schedule, oldest first."""
        sql = "SELECT id, spec, next_at, paused, created_at FROM schedules ORDER BY created_at, id"
        rows = await self._run(self._query, sql, ())
        return [ScheduleRecord(r[0], bytes(r[1]), r[2], bool(r[3]), r[4]) for r in rows]

    @property
    def keeps_segments(self) -> bool:
        """True: the `segments` table keeps journals (schema version 2)."""
        return True

    async def read_segments(self, dispatch_id: str) -> list[bytes]:
        """Return a call's journal segments in order."""
        rows = await self._run(self._query, _SELECT_SEGMENTS, (dispatch_id,))
        return [bytes(row[0]) for row in rows]

    async def list_attempts(self, dispatch_id: str) -> list[AttemptRecord]:
        """Return a call's recorded attempts, oldest first."""
        rows = await self._run(self._query, _SELECT_ATTEMPTS, (dispatch_id,))
        return [AttemptRecord(*row) for row in rows]

    # Event-loop side of the writer.

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError("the store is not open")
        job = functools.partial(self._locked, fn, *args)
        done = asyncio.get_running_loop().run_in_executor(self._executor, job)
        self._count_job(done)
        return await done

    def _count_job(self, done: asyncio.Future[Any]) -> None:
        # Until its future is done, a job may be queued for the writer thread, and
        # then waits for `_conn_lock`: the loop must not hold it across an await.
        self._jobs += 1
        done.add_done_callback(self._job_done)

    def _job_done(self, _: asyncio.Future[Any]) -> None:
        self._jobs -= 1

    async def _flush(self) -> None:
        try:
            # The first batch goes (a write that cannot wait, or the deferral timer, or
            # closing started this); deferred writes left alone after it wait again.
            first = True
            while self._pending and (first or any(not d for _, _, d in self._pending)):
                first = False
                batch = self._take_pending()
                groups = [s for s, _, _ in batch]
                try:
                    if (
                        not self._jobs  # none queued for the writer thread: it is free
                        and sum(map(len, groups)) <= _SPLIT_MAX
                        and self._conn_lock.acquire(blocking=False)
                    ):
                        errors = await self._commit_handed_over(groups)
                    else:
                        errors = await self._run(self._commit_sync, groups)
                except Exception as exc:  # the executor itself failed
                    failed: StoreError | None = self._write_error(exc)
                    errors = [failed] * len(batch)
                answer_writers([f for _, f, _ in batch], errors)
        finally:
            self._flusher = None
            if self._pending and self._deferred is None:
                loop = asyncio.get_running_loop()
                self._deferred = loop.call_later(DEFER_MAX, self._start_flush)

    # Writer-thread side: only these methods touch the connection, always under
    # `_conn_lock` (`_commit_sync` also on the loop's thread, for a write made alone, and
    # `_apply` for a small transaction that the writer thread commits).

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._conn_lock:
            return fn(*args)

    def _open_sync(self) -> None:
        on_disk = self._path != ":memory:"
        if on_disk:
            self._prepare_files()
        try:
            conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=1.0, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {self._path!r}: {exc}") from exc
        try:
            # One scheduler per database: the exclusive lock is taken on first access.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._check_integrity(conn)
            self._migrate(conn)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (_COMMITS_KEY,))
            self._counted = conn.execute(
                "SELECT value FROM meta WHERE key = ?", (_COMMITS_KEY,)
            ).fetchone()[0]
            if on_disk:
                self._check_mark()
                self._secure(self._path + "-wal", self._path + "-shm")
        except sqlite3.OperationalError as exc:
            conn.close()
            self._close_mark()
            if "locked" in str(exc):
                raise StoreInUseError(
                    f"the database {self._path!r} is in use by another process "
                    "(is another scheduler running on it?); stop it or use another file"
                ) from exc
            raise StoreError(f"cannot open the database {self._path!r}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database", corrupt pages
            conn.close()
            self._close_mark()
            raise StoreError(
                f"the database {self._path!r} is damaged ({exc}); restore it from a backup, "
                "or move it away to start with an empty one (its calls are then lost)"
            ) from exc
        except BaseException:
            conn.close()
            self._close_mark()
            raise
        self._conn = conn

    def _prepare_files(self) -> None:
        """Check the folder, make the files owner-only, and open the mark file."""
        folder = os.path.dirname(os.path.abspath(self._path))
        if not os.path.isdir(folder):
            raise StoreError(f"cannot open the database {self._path!r}: {folder!r} is no folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(
                f"cannot open the database {self._path!r}: its folder {folder!r} is not "
                "writable by this user, and SQLite keeps its write-ahead log beside the "
                "database; make the folder writable or choose another"
            )
        try:
            # Created owner-only (SQLite gives the -wal and -shm files the database's mode).
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, _FILE_MODE))
            self._mark = os.open(self._path + ".mark", os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise StoreError(
                f"cannot open the database {self._path!r}: {exc.strerror or exc}"
            ) from exc
        self._secure(self._path, self._path + ".mark", self._path + "-wal", self._path + "-shm")

    @staticmethod
    def _secure(*paths: str) -> None:
        for path in paths:
            try:
                if os.stat(path).st_mode & 0o077:
                    os.chmod(path, _FILE_MODE)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(
                    f"cannot make {path!r} readable by its owner only ({exc.strerror or exc}); "
                    "it holds the scheduler's signing key"
                ) from exc

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            # One report may hold several lines: the error stays on one.
            lines = [" ".join(line.split()) for row in rows for line in row.splitlines()]
            problems = [line for line in lines if line and not line.startswith("***")]
            raise StoreError(
                f"the database {self._path!r} is damaged (quick_check: "
                f"{'; '.join(problems[:3])}); restore it from a backup, or move it "
                "away to start with an empty one (its calls are then lost)"
            )

    def _check_mark(self) -> None:
        assert self._mark is not None
        data = os.pread(self._mark, 8, 0)
        marked = int.from_bytes(data, "big") if len(data) == 8 else 0
        if marked > self._counted:
            raise StoreError(
                f"the database {self._path!r} lost committed work: it holds "
                f"{self._counted} transactions, but {marked} were committed (its write-ahead "
                f"log {self._path + '-wal'!r} was deleted or truncated, or the file was "
                f"emptied or replaced); restore the folder from a backup, or, to start over "
                f"with an empty database (its calls are then lost), delete {self._path!r} "
                f"and every file beside it whose name begins the same"
            )
        self._write_mark()

    def _write_mark(self) -> None:
        if self._mark is not None:
            os.pwrite(self._mark, self._counted.to_bytes(8, "big"), 0)

    def _close_mark(self) -> None:
        if self._mark is not None:
            os.close(self._mark)
            self._mark = None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database {self._path!r} has schema version {version}, newer than "
                f"the {SCHEMA_VERSION} this version of dispatch_aio knows; upgrade "
                "dispatch_aio or use another file"
            )
        while version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            logger.info("database %s migrated to schema version %d", self._path, version + 1)
            version += 1

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._mark is not None:
            os.fsync(self._mark)
            self._close_mark()

    async def _commit_handed_over(self, groups: list[list[_Statement]]) -> list[StoreError | None]:
        """Apply `groups` on the loop's thread, COMMIT on the writer thread.

        Called with `_conn_lock` held, which the writer thread releases once committed.
        """
        start = time.perf_counter()
        try:
            conn = self._require()
            errors = self._apply(conn, groups)
        except BaseException:
            self._conn_lock.release()
            raise
        if not conn.in_transaction:
            self._conn_lock.release()
            return errors
        started = threading.Event()
        try:
            assert self._executor is not None
            done = asyncio.get_running_loop().run_in_executor(
                self._executor, self._commit_released, conn, start, started
            )
        except BaseException:  # the executor itself failed: nothing was written
            conn.execute("ROLLBACK")
            self._conn_lock.release()
            raise
        self._count_job(done)
        started.wait(_HANDOVER_MAX)  # lets the writer thread take the interpreter lock
        # Shielded: cancelled before it ran, the job would never release the lock.
        error = await asyncio.shield(done)
        return errors if error is None else [error] * len(groups)

    def _commit_released(
        self, conn: sqlite3.Connection, start: float, started: threading.Event
    ) -> StoreError | None:
        try:
            started.set()
            self._commit(conn, start)
        except sqlite3.Error as exc:
            return self._write_error(exc)
        finally:
            self._conn_lock.release()
        return None

    def _commit_sync(self, groups: list[list[_Statement]]) -> list[StoreError | None]:
        """Commit all groups in one transaction (`_apply`)."""
        start = time.perf_counter()
        conn = self._require()
        errors = self._apply(conn, groups)
        if conn.in_transaction:
            try:
                self._commit(conn, start)
            except sqlite3.Error as exc:
                return [self._write_error(exc)] * len(groups)
        return errors

    def _apply(
        self, conn: sqlite3.Connection, groups: list[list[_Statement]]
    ) -> list[StoreError | None]:
        """Begin a transaction and apply all groups in it.

        If a group fails, the batch is applied again with a savepoint per group, so that
        only the failing groups are left out. The transaction is left open for `_commit`
        unless nothing could be applied.
        """
        try:
            self._begin(conn, [[s for group in groups for s in group]])
            return [None] * len(groups)
        except sqlite3.Error as exc:
            if len(groups) == 1:
                return [self._write_error(exc)]
        errors: list[StoreError | None] = []
        try:
            self._begin(conn, groups, errors)
        except sqlite3.Error as exc:
            return [self._write_error(exc)] * len(groups)
        return errors

    def _write_error(self, exc: BaseException) -> StoreError:
        """The error of a failed write: the file, what happened, and what to do."""
        if isinstance(exc, _KeyTaken):
            return KeyTakenError(f"the database write was refused: {exc}")
        code = getattr(exc, "sqlite_errorcode", None)
        where = f"cannot write to the database {self._path!r}"
        if code == sqlite3.SQLITE_FULL:
            return StoreError(
                f"{where}: its disk is full; free space there (nothing was written, and "
                "the scheduler tries again)"
            )
        if code == sqlite3.SQLITE_READONLY:
            return StoreError(
                f"{where}: it has become read-only ({exc}); make it and its folder writable "
                "by this user again (nothing was written, and the scheduler tries again)"
            )
        if code == sqlite3.SQLITE_IOERR:
            return StoreError(f"{where}: the disk reports an I/O error ({exc}); check the disk")
        if code == sqlite3.SQLITE_CORRUPT:
            return StoreError(
                f"{where}: it is damaged ({exc}); stop the scheduler and restore the "
                "database from a backup"
            )
        return StoreError(f"{where}: {exc}")

    def _begin(
        self,
        conn: sqlite3.Connection,
        groups: list[list[_Statement]],
        errors: list[StoreError | None] | None = None,
    ) -> None:
        """Open a transaction and apply `groups`; with `errors`, each group in a savepoint."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for group in groups:
                if errors is None:
                    _execute(conn, group)
                    continue
                conn.execute("SAVEPOINT grp")
                try:
                    _execute(conn, group)
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO grp")
                    errors.append(self._write_error(exc))
                else:
                    errors.append(None)
                conn.execute("RELEASE grp")
            conn.execute(_COUNT_COMMIT)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _commit(self, conn: sqlite3.Connection, start: float) -> None:
        """Commit the transaction `_begin` opened (`start`: when it began)."""
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._commits += 1
        self._counted += 1
        self._last_end = time.perf_counter()
        self._last_commit = self._last_end - start
        try:
            self._write_mark()
        except OSError as exc:  # committed all the same; only damage detection is weaker
            logger.warning("cannot update %s.mark: %s", self._path, exc)

    def _load_sync(self) -> Snapshot:
        conn = self._require()
        try:
            calls = [
                call_from_row(row)[1]
                for row in conn.execute(f"{_SELECT_CALLS} WHERE phase != 4 ORDER BY seq")
            ]
            results = [
                QueuedResult(seq=row[0], poller_id=row[1], generation=row[2], result=row[3])
                for row in conn.execute(
                    "SELECT seq, poller_id, generation, result FROM results ORDER BY seq"
                )
            ]
            top = conn.execute("SELECT max(seq) FROM results").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the database {self._path!r}: {exc}") from exc
        return Snapshot(calls=calls, results=results, next_seq=(top or 0) + 1)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            return self._require().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the database {self._path!r}: {exc}") from exc

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn
