"""PostgreSQL implementation of the scheduler's `Store`, on asyncpg.

Several schedulers (replicas) may drive one database at once: call trees are spread
over partitions, each held by one replica through a lease row (see `Coordination` and
`PostgresCoordination`), and every write that drives a call checks, in its own
transaction, that its replica still holds the call's partition (`Fence`): a replica
that lost a lease cannot commit anything for that partition. Each store writes through
one connection of its own; when it is lost, writes fail with `StoreError` (the engine
retries the calls they were for), and the next write connects again.

Writes of concurrent operations are grouped as in the SQLite store: while a
transaction commits, new writes queue up and the next transaction takes all of them;
if one group fails, the batch is applied again with a savepoint per group, so that
only the failing writes fail. A small transaction of the usual kinds goes as one
statement of data-modifying WITH queries instead (`_combined`): one round trip where
BEGIN, each statement and COMMIT take one each. Reads (start-up recovery, inspection,
journal segments) use a small pool of other connections and see every committed write.

A connection lost while its COMMIT was on the way leaves the outcome unknown. Each
transaction therefore records a random token in the database, in a row of its own
replica (``dispatch_commit_marks``); the store connects again, reads the token back,
and only then answers the writers of that transaction:
success if the token is there, `StoreError` if not. Answering either way without
knowing would let the scheduler run a call again whose outcome was committed, or act
on one that was not.

A transaction that finishes calls notifies ``dispatch_done`` with their ids, and one
that creates calls for another replica notifies ``dispatch_calls`` (`Announce`):
PostgreSQL delivers notifications only when, and if, the transaction commits.

Commits are durable when the server acknowledges them (``synchronous_commit`` is
turned on for the session if the server has it off). The schema version is kept in
the ``dispatch_schema`` table; `_MIGRATIONS[n]` upgrades a database from version n to
n + 1, in one transaction at open, and a database of a newer version is refused.

asyncpg is an optional dependency (``pip install 'dispatch-aio[postgres]'``),
imported when a store is opened.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "PostgresStore", "mask_url"]

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._coordination import Coordination
from ._interface import (
    AddAttempt,
    AddResult,
    Announce,
    AppendSegment,
    AttemptRecord,
    CallQuery,
    CallRecord,
    DeleteSchedule,
    Fence,
    FencedError,
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
    UpdateCall,
    answer_writers,
    without_delivered,
)
from ._rows import (
    CALL_COLUMNS,
    MUTABLE_AT,
    MUTABLE_COLUMNS,
    call_from_row,
    call_params,
)

logger = logging.getLogger("dispatch_aio.scheduler")

T = TypeVar("T")

SCHEMA_VERSION = 8
"""Version of the schema this module writes (the ``dispatch_schema`` table)."""

INSTALL_HINT = "pip install 'dispatch-aio[postgres]'"

# The advisory lock that serializes migrations of replicas starting together.
_MIGRATION_LOCK = int.from_bytes(b"dispatch", "big")
_APPLICATION_NAME = "dispatch-aio scheduler"
_READERS = 4  # connections of the read pool
_CONNECT_TIMEOUT = 10.0
_COMMAND_TIMEOUT = 60.0  # a statement taking longer: the connection is deemed lost
_FENCED = "DA001"  # SQLSTATE raised by dispatch_fence
_KEY_TAKEN = "DA002"  # SQLSTATE raised by dispatch_put_key
_NOTIFY_CHUNK = 7000  # bytes of ids per notification (PostgreSQL takes up to 8000)
_RESOLVE_BACKOFF = (0.05, 2.0)  # first and longest wait between reconnections

_SCHEMA_V1 = """
CREATE TABLE dispatch_calls (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    root_id text NOT NULL,
    parent_id text NOT NULL,
    correlation_id bigint NOT NULL,
    parent_generation bigint NOT NULL,
    endpoint text NOT NULL,
    function text NOT NULL,
    input bytea NOT NULL,
    version text NOT NULL,
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    phase integer NOT NULL,
    updated_at double precision NOT NULL,
    generation bigint NOT NULL,
    due_at double precision,
    state_kind integer NOT NULL,
    state bytea NOT NULL,
    min_results integer NOT NULL,
    max_results integer NOT NULL,
    poll_error bytea NOT NULL,
    attempts bigint NOT NULL,
    failures bigint NOT NULL,
    polls bigint NOT NULL,
    status integer NOT NULL,
    last_error text NOT NULL,
    result bytea NOT NULL,
    finished_at double precision
);
CREATE INDEX dispatch_calls_unfinished ON dispatch_calls (seq) WHERE phase <> 4;
CREATE INDEX dispatch_calls_root ON dispatch_calls (root_id, seq);
CREATE INDEX dispatch_calls_parent ON dispatch_calls (parent_id, seq);
CREATE TABLE dispatch_results (
    seq bigint PRIMARY KEY,
    poller_id text NOT NULL,
    generation bigint NOT NULL,
    result bytea NOT NULL
);
CREATE INDEX dispatch_results_poller ON dispatch_results (poller_id);
CREATE TABLE dispatch_meta (
    key text PRIMARY KEY,
    value bytea NOT NULL
);
CREATE TABLE dispatch_segments (
    call_id text NOT NULL,
    polls bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (call_id, polls)
);
CREATE TABLE dispatch_commits (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    token bigint NOT NULL
);
INSERT INTO dispatch_commits (token) VALUES (0);
"""

# Version 2: how many times each call's run diverged from its journal.
_SCHEMA_V2 = "ALTER TABLE dispatch_calls ADD COLUMN divergences bigint NOT NULL DEFAULT 0"
# Version 3: idempotency keys of submissions, kept for a retention period.
_SCHEMA_V3 = """
CREATE TABLE dispatch_idempotency_keys (
    key text PRIMARY KEY,
    dispatch_id text NOT NULL,
    expires_at double precision NOT NULL
);
CREATE INDEX dispatch_idempotency_keys_expiry ON dispatch_idempotency_keys (expires_at);
"""
# Version 4: several replicas on one database. Calls carry the partition of their tree
# (computed from the root id as `partition_of` does); leases on the partitions; live
# replicas; a commit mark per replica; the fence every driving write calls. Queued
# results are renumbered so that a result's seq modulo 64 is its partition: each
# replica numbers the results of the partitions it holds without meeting another's.
_SCHEMA_V4 = """
ALTER TABLE dispatch_calls ADD COLUMN partition integer NOT NULL
    GENERATED ALWAYS AS ((('x' || substr(md5(root_id), 1, 8))::bit(32)::integer) & 63) STORED;
CREATE INDEX dispatch_calls_partition ON dispatch_calls (partition, seq) WHERE phase <> 4;
CREATE TABLE dispatch_leases (
    partition integer PRIMARY KEY,
    owner text NOT NULL DEFAULT '',
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO dispatch_leases (partition) SELECT generate_series(0, 63);
CREATE TABLE dispatch_replicas (
    owner text PRIMARY KEY,
    started_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE dispatch_commit_marks (
    owner text PRIMARY KEY,
    token bigint NOT NULL
);
DROP TABLE dispatch_commits;
UPDATE dispatch_results r SET seq = -(r.seq * 64 + c.partition) - 1
    FROM dispatch_calls c WHERE c.id = r.poller_id;
DELETE FROM dispatch_results WHERE seq >= 0;
UPDATE dispatch_results SET seq = -seq - 1;
CREATE FUNCTION dispatch_fence(p integer, o text, e bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Taking a lease over locks its row FOR UPDATE: not before this transaction ends.
    PERFORM 1 FROM dispatch_leases
        WHERE partition = p AND owner = o AND epoch = e FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'replica % no longer holds partition % (epoch %)', o, p, e
            USING ERRCODE = 'DA001';
    END IF;
END $$;
CREATE FUNCTION dispatch_put_key(k text, d text, e double precision) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Replicas may store one key at once: the live key of another call stays.
    INSERT INTO dispatch_idempotency_keys (key, dispatch_id, expires_at) VALUES (k, d, e)
    ON CONFLICT (key) DO UPDATE SET dispatch_id = excluded.dispatch_id,
        expires_at = excluded.expires_at
    WHERE dispatch_idempotency_keys.dispatch_id = excluded.dispatch_id
        OR dispatch_idempotency_keys.expires_at < extract(epoch FROM clock_timestamp());
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key % is held by another call', k USING ERRCODE = 'DA002';
    END IF;
END $$;
"""
# Version 5: the policy each call carries (retries, attempt timeout, concurrency, rate).
_SCHEMA_V5 = "ALTER TABLE dispatch_calls ADD COLUMN policy bytea NOT NULL DEFAULT ''"
# Version 6: durable events (resolved once, by key) and schedules.
_SCHEMA_V6 = """
CREATE TABLE dispatch_events (
    key text PRIMARY KEY,
    result bytea NOT NULL,
    resolved_at double precision NOT NULL
);
CREATE TABLE dispatch_schedules (
    id text PRIMARY KEY,
    spec bytea NOT NULL,
    next_at double precision NOT NULL,
    paused boolean NOT NULL,
    created_at double precision NOT NULL
);
"""
# Version 7: each attempt of a call, with its outcome and time, for `show`.
_SCHEMA_V7 = """
CREATE TABLE dispatch_attempts (
    call_id text NOT NULL,
    number integer NOT NULL,
    started_at double precision NOT NULL,
    finished_at double precision NOT NULL,
    status integer NOT NULL,
    outcome text NOT NULL,
    seq bigserial
);
CREATE INDEX dispatch_attempts_call ON dispatch_attempts (call_id, number);
"""
# Version 8: the trace context each call was made in.
_SCHEMA_V8 = "ALTER TABLE dispatch_calls ADD COLUMN trace_context text NOT NULL DEFAULT ''"
_MIGRATIONS: tuple[str, ...] = (
    _SCHEMA_V1,
    _SCHEMA_V2,
    _SCHEMA_V3,
    _SCHEMA_V4,
    _SCHEMA_V5,
    _SCHEMA_V6,
    _SCHEMA_V7,
    _SCHEMA_V8,
)

_INSERT_CALL = (
    f"INSERT INTO dispatch_calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(CALL_COLUMNS) + 1))})"
)
_UPDATE_CALL = (
    f"UPDATE dispatch_calls SET "
    f"{', '.join(f'{c} = ${i}' for i, c in enumerate(MUTABLE_COLUMNS, 1))} "
    f"WHERE id = ${len(MUTABLE_COLUMNS) + 1}"
)
_ADD_RESULT = (
    "INSERT INTO dispatch_results (seq, poller_id, generation, result) VALUES ($1, $2, $3, $4)"
)
_REMOVE_RESULTS = "DELETE FROM dispatch_results WHERE seq = ANY($1::bigint[])"
_REMOVE_POLLER_RESULTS = "DELETE FROM dispatch_results WHERE poller_id = $1"
_SET_META = (
    "INSERT INTO dispatch_meta (key, value) VALUES ($1, $2) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
_KEEP_META = "INSERT INTO dispatch_meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING"
_APPEND_SEGMENT = "INSERT INTO dispatch_segments (call_id, polls, data) VALUES ($1, $2, $3)"
_REMOVE_SEGMENTS = "DELETE FROM dispatch_segments WHERE call_id = $1"
_PUT_KEY = "SELECT dispatch_put_key($1, $2, $3)"
_PRUNE_KEYS = "DELETE FROM dispatch_idempotency_keys WHERE expires_at < $1"
# A plain INSERT: a key resolved already fails the whole write.
_PUT_EVENT = "INSERT INTO dispatch_events (key, result, resolved_at) VALUES ($1, $2, $3)"
_PUT_SCHEDULE = (
    "INSERT INTO dispatch_schedules (id, spec, next_at, paused, created_at) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, "
    "next_at = excluded.next_at, paused = excluded.paused"
)
_MOVE_SCHEDULE = "UPDATE dispatch_schedules SET next_at = greatest(next_at, $2) WHERE id = $1"
_DELETE_SCHEDULE = "DELETE FROM dispatch_schedules WHERE id = $1"
_ADD_ATTEMPT = (
    "INSERT INTO dispatch_attempts (call_id, number, started_at, finished_at, status, outcome) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
_SELECT_ATTEMPTS = (
    "SELECT call_id, number, started_at, finished_at, status, outcome FROM dispatch_attempts "
    "WHERE call_id = $1 ORDER BY number, seq"
)
_SELECT_SEGMENTS = "SELECT data FROM dispatch_segments WHERE call_id = $1 ORDER BY polls"
_SELECT_CALLS = f"SELECT seq, {', '.join(CALL_COLUMNS)} FROM dispatch_calls"
_MARK_COMMIT = "UPDATE dispatch_commit_marks SET token = $1 WHERE owner = $2"
_READ_MARK = "SELECT token FROM dispatch_commit_marks WHERE owner = $1"
_ADD_MARK = "INSERT INTO dispatch_commit_marks (owner, token) VALUES ($1, 0) ON CONFLICT DO NOTHING"
_FENCE = "SELECT dispatch_fence($1, $2, $3)"
_NOTIFY = "SELECT pg_notify($1, $2)"
# Markers, not SQL: gathered into notifications sent at the end of the transaction.
_DONE = "-- done"
_ANNOUNCE = "-- announce"

_Statement = tuple[str, tuple[Any, ...]]

# The statements a write may combine into one (`_combined`), each split around its
# parameters (text, number, text, ...) to number them anew; the SELECTs among them.
# Other kinds (meta, keys, events, schedules: rare writes) go one by one.
_PARTS = MappingProxyType(
    {
        sql: tuple(re.split(r"\$(\d+)", sql))
        for sql in (
            _FENCE,
            _NOTIFY,
            _INSERT_CALL,
            _UPDATE_CALL,
            _ADD_RESULT,
            _REMOVE_RESULTS,
            _REMOVE_POLLER_RESULTS,
            _APPEND_SEGMENT,
            _REMOVE_SEGMENTS,
            _ADD_ATTEMPT,
            _PUT_KEY,
            _MARK_COMMIT,
        )
    }
)
_SELECTS = (_FENCE, _NOTIFY, _PUT_KEY)
# The table each writing statement writes (`_arrange`).
_TABLES = MappingProxyType(
    {
        _INSERT_CALL: "calls",
        _UPDATE_CALL: "calls",
        _ADD_RESULT: "results",
        _REMOVE_RESULTS: "results",
        _REMOVE_POLLER_RESULTS: "results",
        _SET_META: "meta",
        _KEEP_META: "meta",
        _APPEND_SEGMENT: "segments",
        _REMOVE_SEGMENTS: "segments",
        _PUT_KEY: "keys",
        _PRUNE_KEYS: "keys",
        _PUT_EVENT: "events",
        _PUT_SCHEDULE: "schedules",
        _MOVE_SCHEDULE: "schedules",
        _DELETE_SCHEDULE: "schedules",
        _NOTIFY: "",  # sent at the commit, whatever their order
    }
)
_COMBINE_MAX = 32  # statements; a larger write (a gather's children) goes by executemany
_ID_AT = CALL_COLUMNS.index("id")


def mask_url(url: str) -> str:
    """Return a database URL with its password (in the user part or the query) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an invalid URL>"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StoreError(
            f"the PostgreSQL store needs the asyncpg package: {INSTALL_HINT}"
        ) from None
    return asyncpg


def _text(value: str) -> str:
    # PostgreSQL text holds neither NUL nor unpaired surrogates; free-form strings (an
    # error message, a version) must never make a write fail for good.
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _update_params(r: CallRecord) -> tuple[Any, ...]:
    values = call_params(r, _text)
    return (*(values[i] for i in MUTABLE_AT), r.id)


def _statements(op: Op) -> list[_Statement]:
    match op:  # the ops of every attempt first
        case Fence(partition, replica, epoch):
            return [(_FENCE, (partition, replica, epoch))]
        case UpdateCall(record):
            update = (_UPDATE_CALL, _update_params(record))
            return [update, (_DONE, (record.id,))] if record.phase is Phase.DONE else [update]
        case AddAttempt(a):
            row = (a.call_id, a.number, a.started_at, a.finished_at, a.status, _text(a.outcome))
            return [(_ADD_ATTEMPT, row)]
        case InsertCall(record):
            return [(_INSERT_CALL, call_params(record, _text))]
        case AddResult(q):
            return [(_ADD_RESULT, (q.seq, q.poller_id, q.generation, q.result))]
        case RemoveResults(seqs):
            return [(_REMOVE_RESULTS, (list(seqs),))] if seqs else []
        case RemovePollerResults(poller_id):
            return [(_REMOVE_POLLER_RESULTS, (poller_id,))]
        case SetMeta(key, value, keep):
            return [(_KEEP_META if keep else _SET_META, (key, value))]
        case AppendSegment(call_id, polls, data):
            return [(_APPEND_SEGMENT, (call_id, polls, data))]
        case RemoveSegments(call_id):
            return [(_REMOVE_SEGMENTS, (call_id,))]
        case PutIdempotencyKey(key, dispatch_id, expires_at):
            return [(_PUT_KEY, (key, dispatch_id, expires_at))]
        case PruneIdempotencyKeys(before):
            return [(_PRUNE_KEYS, (before,))]
        case Announce(partition, ids):
            return [(_ANNOUNCE, (partition, ids))] if ids else []
        case PutEvent(key, result, resolved_at):
            # The replicas whose calls wait on the key learn it at the commit.
            return [
                (_PUT_EVENT, (_text(key), result, resolved_at)),
                (_NOTIFY, ("dispatch_events", key)),
            ]
        case PutSchedule(r):
            changed = (_NOTIFY, ("dispatch_schedules", r.id))  # for the other replicas
            return [(_PUT_SCHEDULE, (r.id, r.spec, r.next_at, r.paused, r.created_at)), changed]
        case MoveSchedule(schedule_id, next_at):
            return [(_MOVE_SCHEDULE, (schedule_id, next_at))]
        case DeleteSchedule(schedule_id):
            changed = (_NOTIFY, ("dispatch_schedules", schedule_id))
            return [(_DELETE_SCHEDULE, (schedule_id,)), changed]


def _notifications(statements: list[_Statement]) -> list[_Statement]:
    """Return the notifications of a transaction's markers, ids grouped in few payloads."""
    done: list[str] = []
    announced: dict[int, list[str]] = {}
    for sql, params in statements:
        if sql is _DONE:
            done.append(params[0])
        elif sql is _ANNOUNCE:
            announced.setdefault(params[0], []).extend(params[1])
    notes = [(_NOTIFY, ("dispatch_done", payload)) for payload in _chunks(done, "")]
    for partition, ids in announced.items():
        notes.extend((_NOTIFY, ("dispatch_calls", p)) for p in _chunks(ids, f"{partition} "))
    return notes


def _chunks(ids: list[str], prefix: str) -> list[str]:
    payloads: list[str] = []
    part: list[str] = []
    size = 0
    for dispatch_id in ids:
        if part and size + len(dispatch_id) > _NOTIFY_CHUNK:
            payloads.append(prefix + ",".join(part))
            part, size = [], 0
        part.append(dispatch_id)
        size += len(dispatch_id) + 1
    if part:
        payloads.append(prefix + ",".join(part))
    return payloads


def _arrange(statements: list[_Statement]) -> list[_Statement]:
    """Put a transaction's statements in the order to run them.

    Fences first (one per partition and epoch: the first holds the lease row until the
    commit), then the writes grouped by table, each table's in their own order, then
    the attempt rows, then the notifications of the markers. No statement reads or
    writes a table other than its own (no triggers, no foreign keys; the attempt rows
    are a log nothing reads), so only the order within a table tells. Grouped, the
    writes of many operations committed together (each a call's update and its
    parent's queued result, or a call and its idempotency key) run as a few runs of
    one SQL each, one round trip each (see `_execute`), not one round trip each.
    """
    fences: dict[tuple[Any, ...], _Statement] = {}
    tables: dict[str, list[_Statement]] = {}
    attempts: list[_Statement] = []
    marked = False
    for statement in statements:
        sql = statement[0]
        if sql is _FENCE:
            fences.setdefault(statement[1], statement)
        elif sql is _DONE or sql is _ANNOUNCE:
            marked = True
        elif sql is _ADD_ATTEMPT:
            attempts.append(statement)
        else:
            tables.setdefault(_TABLES[sql], []).append(statement)
    body = [statement for writes in tables.values() for statement in writes]
    if not fences and not marked and not attempts:
        return body
    notes = _notifications(statements) if marked else []
    return [*fences.values(), *body, *attempts, *notes]


def _combined(statements: list[_Statement], token: int, replica: str) -> _Statement | None:
    """One statement that makes all of `statements` and the commit mark, if it may.

    A statement of data-modifying WITH queries commits on its own, in one round trip
    to the server, where a transaction takes one per statement and two more (BEGIN,
    COMMIT): a step of a chain of awaits took about ten. Its parts all see the
    database as it was before the statement, in no set order, and PostgreSQL cannot
    change a row twice in one statement: they may go together only if no part
    touches a row another part writes, which the keys below check (a call's id among
    the calls inserted and updated; a result's seq, and its poller, among results
    added and removed; a call's segments appended and removed). Rows numbered in the
    order of their inserts (a call's seq, an attempt's) must not depend on it: one
    call inserted at most, and one attempt of each number of a call. An idempotency
    key goes once. None if not, if a kind is not combinable, or for a large write.
    """
    arranged = _arrange(statements)
    if len(arranged) > _COMBINE_MAX:
        return None
    inserted = False
    keys: set[Any] = set()  # attempts' (call, number), idempotency keys
    calls: set[str] = set()
    added: set[int] = set()
    removed: set[int] = set()
    pollers: set[str] = set()
    cleared: set[str] = set()
    appended: set[str] = set()
    dropped: set[str] = set()
    for sql, params in arranged:
        if sql not in _PARTS:
            return None
        if sql is _UPDATE_CALL or sql is _INSERT_CALL:
            call_id = params[-1] if sql is _UPDATE_CALL else params[_ID_AT]
            if call_id in calls or (inserted and sql is _INSERT_CALL):
                return None
            calls.add(call_id)
            inserted = inserted or sql is _INSERT_CALL
        elif sql is _ADD_ATTEMPT or sql is _PUT_KEY:
            key = params[:2] if sql is _ADD_ATTEMPT else params[0]
            if key in keys:
                return None
            keys.add(key)
        elif sql is _ADD_RESULT:
            added.add(params[0])
            pollers.add(params[1])
        elif sql is _REMOVE_RESULTS:
            removed.update(params[0])
        elif sql is _REMOVE_POLLER_RESULTS:
            cleared.add(params[0])
        elif sql is _APPEND_SEGMENT:
            appended.add(params[0])
        elif sql is _REMOVE_SEGMENTS:
            dropped.add(params[0])
    if added & removed or pollers & cleared or appended & dropped:
        return None
    # In no set order anyway: sorted, a write of the same kinds is the same statement
    # (asyncpg prepares each text once).
    arranged.sort(key=lambda statement: statement[0])
    arranged.append((_MARK_COMMIT, (token, replica)))
    queries: list[str] = []
    selects: list[str] = []
    args: list[Any] = []
    for i, (sql, params) in enumerate(arranged):
        parts = _PARTS[sql]
        text = "".join(
            part if j % 2 == 0 else f"${int(part) + len(args)}" for j, part in enumerate(parts)
        )
        args.extend(params)
        if sql in _SELECTS:  # evaluated only if read: the final SELECT reads them
            queries.append(f"q{i} AS ({text} AS x)")
            selects.append(f"q{i}")
        else:
            queries.append(f"q{i} AS ({text})")
    final = (
        f"SELECT {' + '.join(f'count({q}.x)' for q in selects)} FROM {', '.join(selects)}"
        if selects
        else "SELECT 1"
    )
    return f"WITH {', '.join(queries)} {final}", tuple(args)


async def _execute(conn: Any, statements: list[_Statement]) -> None:
    # Consecutive statements with the same SQL go through one executemany (one round trip).
    i = 0
    while i < len(statements):
        sql = statements[i][0]
        j = i + 1
        while j < len(statements) and statements[j][0] == sql:
            j += 1
        if j - i == 1:
            await conn.execute(sql, *statements[i][1])
        else:
            await conn.executemany(sql, [params for _, params in statements[i:j]])
        i = j


class _InDoubt(Exception):
    """The connection was lost while a COMMIT was on the way."""

    def __init__(self, token: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.token = token


_DISK_FULL = "53100"
_READ_ONLY = "25006"  # read_only_sql_transaction: a standby, or default_transaction_read_only
_READ_ONLY_FIX = "point --database at the primary, not a standby, or end its read-only mode"


def _write_error(exc: BaseException, where: str) -> StoreError:
    """The error of a failed write: what happened on the server `where`, and what to do."""
    state = getattr(exc, "sqlstate", None)
    if state == _FENCED:
        return FencedError(f"the database write was fenced off: {exc}")
    if state == _KEY_TAKEN:
        return KeyTakenError(f"the database write was refused: {exc}")
    failed = f"the database write failed on {where}"
    again = "nothing was written, and the scheduler tries again"
    if state == _DISK_FULL:
        return StoreError(
            f"{failed}: the server's disk is full ({exc}); free space there ({again})"
        )
    if state == _READ_ONLY:
        return StoreError(f"{failed}: the server accepts no writes ({exc}); {_READ_ONLY_FIX}")
    return StoreError(f"{failed}: {exc}")


class PostgresStore(Store):
    """A `Store` in a PostgreSQL database, which several scheduler replicas may share.

    The tables (``dispatch_calls``, ``dispatch_results``, ``dispatch_segments``,
    ``dispatch_meta``, ``dispatch_leases``, ``dispatch_replicas``,
    ``dispatch_commit_marks``, ``dispatch_idempotency_keys`` and ``dispatch_schema``)
    are created in the database's default schema on first open. The database user needs the right to
    create tables there the first time, and to read and write them afterwards.

    Args:
        url: The database, as ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE``
            (query parameters as libpq's, such as ``?sslmode=require`` or
            ``?host=/run/postgresql`` for a Unix socket). Without a password in the
            URL, ``PGPASSWORD`` or ``~/.pgpass`` is used.
        replica: This scheduler's name among the replicas sharing the database
            (default: host name, process id and a random suffix). It must be unique
            among running replicas.

    Raises:
        ValueError: `url` is not a ``postgresql://`` URL.
    """

    def __init__(self, url: str, *, replica: str = "") -> None:
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"{mask_url(url)!r} is not a PostgreSQL URL: expected "
                "postgresql://USER@HOST/DATABASE"
            )
        self._url = url
        self._masked = mask_url(url)
        self._pg: Any = None  # the asyncpg module, once open
        self._conn: Any = None  # the writing connection
        self._replica = replica or (f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
        self._coordination: Coordination | None = None
        self._pool: Any = None  # read connections
        self._opened = False
        self._closing = False
        self._lost = False  # the writing connection was lost (logged once)
        self._pending: list[tuple[list[_Statement], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._commits = 0

    @property
    def url(self) -> str:
        """The database URL, with its password masked (for messages)."""
        return self._masked

    @property
    def replica(self) -> str:
        """This scheduler's name among the replicas sharing the database."""
        return self._replica

    @property
    def commits(self) -> int:
        """Number of write transactions committed so far (to observe batching)."""
        return self._commits

    async def open(self) -> None:
        """Connect, and create or migrate the schema.

        Raises:
            StoreError: asyncpg is not installed, the server cannot be reached or
                refuses the connection, or the database's schema is newer than this
                version knows.
        """
        if self._opened:
            return
        self._pg = _import_asyncpg()
        self._closing = False
        self._conn = await self._connect_writer()
        try:
            self._pool = await self._pg.create_pool(
                self._url,
                min_size=0,
                max_size=_READERS,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
                server_settings={"application_name": _APPLICATION_NAME},
            )
        except BaseException:
            await self._drop()
            raise
        self._opened = True

    async def close(self) -> None:
        """Commit pending writes and close the connections."""
        if not self._opened:
            return
        self._closing = True
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        self._opened = False
        conn = self._conn
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception, TimeoutError):  # the mark is of no more use
                await conn.execute(
                    "DELETE FROM dispatch_commit_marks WHERE owner = $1", self._replica
                )
        await self._drop()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (Exception, TimeoutError):
                pool.terminate()

    async def write(self, ops: Sequence[Op]) -> None:
        """Apply `ops` in one transaction shared with concurrent writes.

        Raises:
            StoreError: The transaction failed, or the database cannot be reached;
                none of `ops` was applied.
        """
        if not self._opened:
            raise StoreError("the store is not open")
        statements = [s for op in without_delivered(ops) for s in _statements(op)]
        if not statements:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((statements, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        await future

    async def load(self) -> Snapshot:
        """Return every unfinished call and the results queued for them."""

        async def read(conn: Any) -> Snapshot:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                calls = await conn.fetch(f"{_SELECT_CALLS} WHERE phase <> 4 ORDER BY seq")
                results = await conn.fetch(
                    "SELECT seq, poller_id, generation, result FROM dispatch_results ORDER BY seq"
                )
            return Snapshot(
                calls=[call_from_row(row)[1] for row in calls],
                results=[QueuedResult(r[0], r[1], r[2], r[3]) for r in results],
                next_seq=(results[-1][0] if results else 0) + 1,
            )

        return await self._read(read)

    async def get_call(self, dispatch_id: str) -> CallRecord | None:
        """Return a call by dispatch id, or None."""
        rows = await self._fetch(f"{_SELECT_CALLS} WHERE id = $1", dispatch_id)
        return call_from_row(rows[0])[1] if rows else None

    async def list_calls(self, query: CallQuery) -> list[tuple[int, CallRecord]]:
        """Return the calls matching `query` in creation order (or the newest first)."""
        where = ["seq > $1"]
        params: list[Any] = [query.after]

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if query.before:
            where.append(f"seq < {param(query.before)}")
        if query.phases:
            where.append(f"phase = ANY({param([int(p) for p in query.phases])}::integer[])")
            if Phase.DONE not in query.phases:
                where.append("phase <> 4")  # the condition of the index of unfinished calls
        if query.statuses:
            where.append(f"phase = 4 AND status = ANY({param(list(query.statuses))}::integer[])")
        if query.root_id:
            where.append(f"root_id = {param(query.root_id)}")
        if query.parent_id is not None:
            where.append(f"parent_id = {param(query.parent_id)}")
        order = "seq DESC" if query.newest_first else "seq"
        sql = f"{_SELECT_CALLS} WHERE {' AND '.join(where)} ORDER BY {order}"
        if query.limit is not None:
            sql += f" LIMIT {param(query.limit)}"
        return [call_from_row(row) for row in await self._fetch(sql, *params)]

    async def count_children(self, dispatch_ids: Sequence[str]) -> dict[str, int]:
        """Return how many direct children each of `dispatch_ids` has."""
        if not dispatch_ids:
            return {}
        rows = await self._fetch(
            "SELECT parent_id, count(*) FROM dispatch_calls "
            "WHERE parent_id = ANY($1::text[]) GROUP BY parent_id",
            list(dispatch_ids),
        )
        return {row[0]: row[1] for row in rows}

    async def get_meta(self, key: str) -> bytes | None:
        """Return a value stored with `SetMeta`, or None."""
        rows = await self._fetch("SELECT value FROM dispatch_meta WHERE key = $1", key)
        return bytes(rows[0][0]) if rows else None

    async def find_idempotency_keys(self, keys: Sequence[str], now: float) -> dict[str, str]:
        """Return the dispatch id of each of `keys` stored and not expired at `now`."""
        if not keys:
            return {}
        rows = await self._fetch(
            "SELECT key, dispatch_id FROM dispatch_idempotency_keys "
            "WHERE key = ANY($1::text[]) AND expires_at >= $2",
            list(keys),
            now,
        )
        return {row[0]: row[1] for row in rows}

    @property
    def keeps_events(self) -> bool:
        """True: events and schedules have tables of their own (schema version 4)."""
        return True

    async def get_events(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Return the outcome of each of `keys` resolved."""
        if not keys:
            return {}
        rows = await self._fetch(
            "SELECT key, result FROM dispatch_events WHERE key = ANY($1::text[])",
            [_text(key) for key in keys],
        )
        return {row[0]: bytes(row[1]) for row in rows}

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Return every schedule, oldest first."""
        rows = await self._fetch(
            "SELECT id, spec, next_at, paused, created_at FROM dispatch_schedules "
            "ORDER BY created_at, id"
        )
        return [ScheduleRecord(r[0], bytes(r[1]), r[2], bool(r[3]), r[4]) for r in rows]

    @property
    def keeps_segments(self) -> bool:
        """True: the ``dispatch_segments`` table keeps journals."""
        return True

    def coordination(self) -> Coordination:
        """Return the leases and wake-ups of the replicas sharing the database."""
        if self._coordination is None:
            from ._pg_coordination import PostgresCoordination

            self._coordination = PostgresCoordination(self)
        return self._coordination

    @property
    def asyncpg(self) -> Any:
        """The asyncpg module (once open)."""
        return self._pg

    @property
    def dsn(self) -> str:
        """The database URL, password included (to connect)."""
        return self._url

    async def read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn` with a connection of the read pool.

        Raises:
            StoreError: The store is not open, or the read failed.
        """
        return await self._read(fn)

    async def read_segments(self, dispatch_id: str) -> list[bytes]:
        """Return a call's journal segments in order."""
        return [bytes(row[0]) for row in await self._fetch(_SELECT_SEGMENTS, dispatch_id)]

    async def list_attempts(self, dispatch_id: str) -> list[AttemptRecord]:
        """Return a call's recorded attempts, oldest first."""
        rows = await self._fetch(_SELECT_ATTEMPTS, dispatch_id)
        return [AttemptRecord(*row) for row in rows]

    # Reads.

    async def _fetch(self, sql: str, *params: Any) -> list[Any]:
        async def read(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *params))

        return await self._read(read)

    async def _read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        if not self._opened or self._pool is None:
            raise StoreError("the store is not open")
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except (Exception, TimeoutError) as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot read the database {self._masked}: {exc}") from exc

    # The writing connection.

    async def _connect_writer(self) -> Any:
        """Connect and bring the schema up to date; return the connection.

        Raises:
            StoreError: The connection failed or the database cannot be used.
        """
        pg = self._pg
        try:
            conn = await pg.connect(
                self._url,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
                server_settings={"application_name": _APPLICATION_NAME},
            )
        except (Exception, TimeoutError) as exc:
            raise StoreError(self._connect_problem(exc)) from None
        try:
            await self._migrate(conn)
            if await conn.fetchval("SHOW synchronous_commit") in ("off", "local"):
                # Acknowledged means durable: never commit asynchronously.
                await conn.execute("SET synchronous_commit = on")
            await conn.execute(_ADD_MARK, self._replica)
        except BaseException as exc:
            conn.terminate()
            if getattr(exc, "sqlstate", None) == _READ_ONLY:
                raise StoreError(
                    f"cannot use the database {self._masked}: it accepts no writes ({exc}); "
                    f"{_READ_ONLY_FIX}"
                ) from None
            if isinstance(exc, pg.PostgresError | pg.InterfaceError | OSError | TimeoutError):
                raise StoreError(f"cannot use the database {self._masked}: {exc}") from None
            raise
        return conn

    def _connect_problem(self, exc: BaseException) -> str:
        pg = self._pg
        reason = str(exc) or type(exc).__name__
        password = urlsplit(self._url).password
        if password:
            reason = reason.replace(password, "***")
        if isinstance(exc, pg.InvalidCatalogNameError):
            fix = "create it (createdb), or give another database in the URL"
        elif isinstance(exc, pg.InvalidAuthorizationSpecificationError | pg.InvalidPasswordError):
            fix = "check the user and password (in the URL, PGPASSWORD or ~/.pgpass)"
        elif isinstance(exc, TimeoutError):
            reason = f"no answer within {_CONNECT_TIMEOUT:g} s"
            fix = "check the host and port, and that PostgreSQL runs there"
        else:
            fix = "check the URL, and that PostgreSQL runs there and accepts connections"
        return f"cannot connect to the database {self._masked}: {reason}; {fix}"

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            # Replicas starting together migrate one after the other.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS dispatch_schema (version integer)")
            version = await conn.fetchval("SELECT max(version) FROM dispatch_schema") or 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database {self._masked} has schema version {version}, newer than "
                    f"the {SCHEMA_VERSION} this version of dispatch_aio knows (a newer "
                    f"dispatch_aio wrote it): upgrade dispatch_aio ({INSTALL_HINT} --upgrade), "
                    "or give this scheduler another database"
                )
            if version == SCHEMA_VERSION:
                return
            for step in range(version, SCHEMA_VERSION):
                await conn.execute(_MIGRATIONS[step])
            await conn.execute("DELETE FROM dispatch_schema")
            await conn.execute("INSERT INTO dispatch_schema (version) VALUES ($1)", SCHEMA_VERSION)
        logger.info("database %s migrated to schema version %d", self._masked, SCHEMA_VERSION)

    async def _writer(self) -> Any:
        """Return the writing connection, connecting again if it was lost."""
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        await self._drop()
        self._conn = await self._connect_writer()
        if self._lost:
            self._lost = False
            logger.warning("connected again to the database %s; writes resume", self._masked)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (Exception, TimeoutError):
            conn.terminate()

    def _connection_lost(self, exc: BaseException) -> StoreError:
        if not self._lost:
            self._lost = True
            logger.warning(
                "lost the connection to the database %s (%s); writes fail until it is back",
                self._masked,
                exc,
            )
        return StoreError(
            f"the database write failed: lost the connection to {self._masked} ({exc}); "
            "connecting again at the next write"
        )

    # Writes.

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    outcomes = await self._commit([s for s, _ in batch])
                except Exception as exc:  # never leave a writer waiting
                    logger.exception("database write failed")
                    outcomes = [StoreError(f"the database write failed: {exc}")] * len(batch)
                answer_writers([future for _, future in batch], outcomes)
        finally:
            self._flusher = None

    async def _commit(self, groups: list[list[_Statement]]) -> list[StoreError | None]:
        """Commit all groups in one transaction; return each group's outcome.

        If a group fails, the batch is applied again in one transaction with a
        savepoint per group, so that only the failing groups are left out.
        """
        pg = self._pg
        try:
            conn = await self._writer()
        except StoreError as exc:
            if not self._lost:
                self._lost = True
                logger.warning("%s; writes fail until the database is back", exc)
            return [exc] * len(groups)
        errors: list[StoreError | None] | None = None
        for attempt in range(2):
            try:
                await self._transaction(conn, groups if attempt else [_flat(groups)], errors)
                return errors if errors is not None else [None] * len(groups)
            except _InDoubt as doubt:
                try:
                    committed = await self._resolve(doubt)
                except StoreError as exc:
                    return [exc] * len(groups)
                if committed and errors is not None:
                    return errors
                if committed:
                    return [None] * len(groups)
                return [self._connection_lost(doubt)] * len(groups)
            except pg.PostgresError as exc:
                if conn.is_closed():
                    await self._drop()
                    return [self._connection_lost(exc)] * len(groups)
                if len(groups) == 1 or attempt:
                    return [_write_error(exc, self._masked)] * len(groups)
                errors = []
            except (pg.InterfaceError, OSError, TimeoutError) as exc:
                await self._drop()
                return [self._connection_lost(exc)] * len(groups)
        raise AssertionError("unreachable")

    async def _transaction(
        self, conn: Any, groups: list[list[_Statement]], errors: list[StoreError | None] | None
    ) -> None:
        """Apply `groups` in one transaction; with `errors`, each group in a savepoint."""
        pg = self._pg
        token = secrets.randbits(63)
        combined = None if errors is not None else _combined(groups[0], token, self._replica)
        if combined is not None:
            await self._committing(conn, token, conn.execute(combined[0], *combined[1]))
            return
        tx = conn.transaction()
        await tx.start()
        try:
            for group in groups:
                if errors is None:
                    await _execute(conn, _arrange(group))
                    continue
                savepoint = conn.transaction()
                await savepoint.start()
                try:
                    await _execute(conn, _arrange(group))
                except pg.PostgresError as exc:
                    if conn.is_closed():
                        raise
                    await savepoint.rollback()
                    errors.append(_write_error(exc, self._masked))
                else:
                    await savepoint.commit()
                    errors.append(None)
            await conn.execute(_MARK_COMMIT, token, self._replica)
        except BaseException:
            if not conn.is_closed():
                try:
                    await tx.rollback()
                except (Exception, TimeoutError):
                    conn.terminate()
            raise
        await self._committing(conn, token, tx.commit())

    async def _committing(self, conn: Any, token: int, commit: Awaitable[object]) -> None:
        """Await `commit` (COMMIT, or a statement that commits on its own).

        Raises:
            asyncpg.PostgresError: The server refused it: nothing was written.
            _InDoubt: The connection was lost meanwhile: it may have committed.
        """
        pg = self._pg
        try:
            await commit
        except pg.PostgresError as exc:
            if not conn.is_closed():
                raise
            raise _InDoubt(token, exc) from exc
        except (pg.InterfaceError, OSError, TimeoutError) as exc:
            conn.terminate()
            raise _InDoubt(token, exc) from exc
        self._commits += 1

    async def _resolve(self, doubt: _InDoubt) -> bool:
        """Return whether the transaction of `doubt` committed, once that can be known.

        Raises:
            StoreError: The store is closing before the outcome could be read.
        """
        await self._drop()
        logger.warning(
            "lost the connection to the database %s while committing (%s); reading the "
            "outcome back before answering",
            self._masked,
            doubt,
        )
        wait, longest = _RESOLVE_BACKOFF
        started = time.monotonic()
        while True:
            try:
                conn = await self._writer()
                token = await conn.fetchval(_READ_MARK, self._replica)
            except StoreError:
                pass
            except (self._pg.PostgresError, self._pg.InterfaceError, OSError, TimeoutError):
                await self._drop()
            else:
                logger.warning(
                    "the transaction in doubt %s (known after %.1f s)",
                    "was committed" if token == doubt.token else "was not committed",
                    time.monotonic() - started,
                )
                return bool(token == doubt.token)
            if self._closing:
                raise StoreError(
                    f"the database write's outcome is unknown: the connection to {self._masked} "
                    "was lost while committing, and the store is closing"
                )
            await asyncio.sleep(wait)
            wait = min(wait * 2, longest)


def _flat(groups: list[list[_Statement]]) -> list[_Statement]:
    return [s for group in groups for s in group]
