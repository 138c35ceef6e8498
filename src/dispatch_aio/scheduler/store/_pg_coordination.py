"""Replicas of the scheduler on one PostgreSQL database: leases and LISTEN/NOTIFY.

Each replica keeps one control connection of its own: it renews the replica's leases
(``dispatch_leases``) and its row among the live replicas (``dispatch_replicas``) there,
and LISTENs on it:

- ``dispatch_calls``: "PARTITION ID,ID...", new calls the replica holding the
  partition should pick up (sent by the transaction that created them);
- ``dispatch_done``: "ID,ID...", calls that finished (for callers waiting on another
  replica than the one that drives the call);
- ``dispatch_cancel``: "ID", a cancellation for the replica driving the call;
- ``dispatch_leases``: a replica let leases go: the others may take them now;
- ``dispatch_events``: "KEY", a durable event was resolved (sent by the transaction
  that stored it), for the calls waiting on it here;
- ``dispatch_schedules``: "ID", a schedule was created, changed or deleted;
- ``dispatch_slots``: "FUNCTION", a concurrency slot of the function was given back.

A function's concurrency slots across the replicas are PostgreSQL advisory locks
``(hashtext(function), slot)`` held by the control connection: a replica that dies
frees its slots with its connection.

Times of leases are the database server's (``now()``), so that the replicas' clocks do
not matter. Taking a lease over locks its row ``FOR UPDATE``, which waits for (here:
skips) the transactions of the previous holder that passed their fence (``FOR KEY
SHARE``): once the new epoch is committed, the old holder cannot commit anything more.
"""

from __future__ import annotations

__all__ = ["PostgresCoordination"]

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._coordination import PARTITIONS, Coordination, Handlers, Leases
from ._interface import CallRecord, QueuedResult, Snapshot, StoreError
from ._rows import CALL_COLUMNS, call_from_row

if TYPE_CHECKING:
    from ._postgres import PostgresStore

logger = logging.getLogger("dispatch_aio.scheduler")

T = TypeVar("T")

_CHANNELS = (
    "dispatch_calls",
    "dispatch_done",
    "dispatch_cancel",
    "dispatch_leases",
    "dispatch_events",
    "dispatch_schedules",
    "dispatch_slots",
)
_CONNECT_TIMEOUT = 10.0
_COMMAND_TIMEOUT = 10.0

_HEARTBEAT = (
    "INSERT INTO dispatch_replicas (owner, started_at, expires_at) "
    "VALUES ($1, now(), now() + make_interval(secs => $2)) "
    "ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at"
)
_RENEW = (
    "UPDATE dispatch_leases SET expires_at = now() + make_interval(secs => $2) "
    "WHERE owner = $1 RETURNING partition, epoch"
)
_LIVE = "SELECT count(*) FROM dispatch_replicas WHERE expires_at > now()"
_TAKE_SLOT = (
    # CASE fixes the order: a slot this session holds is never locked again (a session
    # may lock one twice, and one unlock would then leave it held).
    "SELECT s FROM generate_series(0, $2::integer - 1) s WHERE CASE "
    "WHEN s = ANY($3::integer[]) THEN false ELSE pg_try_advisory_lock(hashtext($1), s) END "
    "LIMIT 1"
)
_GIVE_SLOT = "SELECT pg_advisory_unlock(hashtext($1), $2), pg_notify('dispatch_slots', $1)"
_NEXT_EXPIRY = (
    "SELECT extract(epoch FROM min(expires_at) - now()) FROM dispatch_leases "
    "WHERE owner <> $1 AND owner <> '' AND expires_at > now()"
)
_TAKE = (
    "UPDATE dispatch_leases l SET owner = $1, epoch = l.epoch + 1, "
    "expires_at = now() + make_interval(secs => $2) "
    "FROM (SELECT partition FROM dispatch_leases WHERE expires_at <= now() "
    "ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED) free "
    "WHERE l.partition = free.partition RETURNING l.partition, l.epoch"
)
_CLAIM = (
    "UPDATE dispatch_leases l SET epoch = l.epoch + 1 "
    "FROM (SELECT partition FROM dispatch_leases WHERE owner = $1 "
    "AND partition = ANY($2::integer[]) FOR UPDATE) mine "
    "WHERE l.partition = mine.partition RETURNING l.partition, l.epoch"
)
_RELEASE = (
    "UPDATE dispatch_leases SET owner = '', expires_at = '-infinity' "
    "WHERE owner = $1 AND partition = ANY($2::integer[])"
)
_RELEASE_ALL = "UPDATE dispatch_leases SET owner = '', expires_at = '-infinity' WHERE owner = $1"
_LEAVE = "DELETE FROM dispatch_replicas WHERE owner = $1"
_FORGET_OLD = "DELETE FROM dispatch_replicas WHERE expires_at < now() - interval '1 day'"
_REPLICAS = (
    "SELECT r.owner, count(l.partition) FROM dispatch_replicas r "
    "LEFT JOIN dispatch_leases l ON l.owner = r.owner AND l.expires_at > now() "
    "WHERE r.expires_at > now() GROUP BY r.owner ORDER BY r.owner"
)
_SELECT = f"SELECT seq, {', '.join(CALL_COLUMNS)} FROM dispatch_calls"
_LOAD_RESULTS = (
    "SELECT r.seq, r.poller_id, r.generation, r.result FROM dispatch_results r "
    "JOIN dispatch_calls c ON c.id = r.poller_id "
    "WHERE c.partition = ANY($1::integer[]) ORDER BY r.seq"
)


class PostgresCoordination(Coordination):
    """Leases and wake-ups of the replicas sharing a `PostgresStore`'s database."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._conn: Any = None
        self._handlers: Handlers | None = None
        self._lease = 9.0
        self._lock = asyncio.Lock()  # one use of the control connection at a time
        self._connected_once = False

    @property
    def replica(self) -> str:
        """This replica's name in the lease rows."""
        return self._store.replica

    async def start(self, handlers: Handlers, lease_timeout: float) -> None:
        """Connect the control connection and listen for wake-ups."""
        self._handlers = handlers
        self._lease = lease_timeout
        async with self._lock:
            conn = await self._control()
            await self._run(conn.execute(_FORGET_OLD))

    async def stop(self) -> None:
        """Let every lease go and leave the live replicas."""
        async with self._lock:
            conn, self._conn = self._conn, None
            self._handlers = None
            if conn is None or conn.is_closed():
                return
            try:
                async with conn.transaction():
                    await conn.execute(_RELEASE_ALL, self.replica)
                    await conn.execute(_LEAVE, self.replica)
                    await conn.execute("NOTIFY dispatch_leases")
                await asyncio.wait_for(conn.close(), 2)
            except (Exception, TimeoutError) as exc:
                logger.warning("could not let the leases go (they expire): %s", exc)
                conn.terminate()

    async def renew(self) -> Leases:
        """Renew this replica's leases; take free or expired ones up to the fair share."""
        async with self._lock:
            conn = await self._control()

            async def renew() -> Leases:
                me, lease = self.replica, self._lease
                async with conn.transaction():
                    await conn.execute(_HEARTBEAT, me, lease)
                    rows = list(await conn.fetch(_RENEW, me, lease))
                    live = max(int(await conn.fetchval(_LIVE)), 1)
                    share = -(-PARTITIONS // live)
                    if len(rows) < share:
                        rows += await conn.fetch(_TAKE, me, lease, share - len(rows))
                    expiry = await conn.fetchval(_NEXT_EXPIRY, me)
                return Leases(
                    {row[0]: row[1] for row in rows},
                    share,
                    live,
                    None if expiry is None else float(expiry),
                )

            return await self._run(renew())

    async def claim(self, partitions: Sequence[int]) -> dict[int, int]:
        """Give held partitions a new epoch, after the writes fenced with the old one."""
        async with self._lock:
            conn = await self._control()

            async def claim() -> dict[int, int]:
                rows = await conn.fetch(_CLAIM, self.replica, list(partitions))
                return {row[0]: row[1] for row in rows}

            return await self._run(claim())

    async def release(self, partitions: Sequence[int]) -> None:
        """Let leases go and tell the other replicas."""
        if not partitions:
            return
        async with self._lock:
            conn = await self._control()

            async def release() -> None:
                async with conn.transaction():
                    await conn.execute(_RELEASE, self.replica, list(partitions))
                    await conn.execute("NOTIFY dispatch_leases")

            await self._run(release())

    async def load(self, partitions: Sequence[int]) -> Snapshot:
        """Return the unfinished calls of `partitions` and the results queued for them."""

        async def read(conn: Any) -> Snapshot:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                calls = await conn.fetch(
                    f"{_SELECT} WHERE partition = ANY($1::integer[]) AND phase <> 4 ORDER BY seq",
                    list(partitions),
                )
                results = await conn.fetch(_LOAD_RESULTS, list(partitions))
            return Snapshot(
                calls=[call_from_row(row)[1] for row in calls],
                results=[QueuedResult(r[0], r[1], r[2], r[3]) for r in results],
                next_seq=max((r[0] for r in results), default=0) + 1,
            )

        return await self._store.read(read)

    async def get_calls(self, dispatch_ids: Sequence[str]) -> list[CallRecord]:
        """Return the calls among `dispatch_ids` that exist."""

        async def read(conn: Any) -> list[CallRecord]:
            rows = await conn.fetch(f"{_SELECT} WHERE id = ANY($1::text[])", list(dispatch_ids))
            return [call_from_row(row)[1] for row in rows]

        return await self._store.read(read)

    async def take_slot(self, function: str, limit: int, held: Sequence[int]) -> int | None:
        """Take a free advisory lock among the function's `limit` slots, if any."""
        async with self._lock:
            conn = await self._control()
            # Rows are tried in order and the scan stops at the first lock taken; the
            # slots this replica holds are skipped (a session may lock one twice).
            slot: int | None = await self._run(
                conn.fetchval(_TAKE_SLOT, function, limit, list(held))
            )
            return slot

    async def give_slot(self, function: str, slot: int) -> None:
        """Unlock the slot and notify ``dispatch_slots``."""
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                return  # the connection ended: its locks went with it
            await self._run(conn.execute(_GIVE_SLOT, function, slot))

    async def request_cancel(self, dispatch_id: str) -> None:
        """Notify ``dispatch_cancel`` with the call's id."""

        async def notify(conn: Any) -> None:
            await conn.execute("SELECT pg_notify('dispatch_cancel', $1)", dispatch_id)

        await self._store.read(notify)

    async def replicas(self) -> dict[str, int]:
        """Return the live replicas and the partitions each holds."""

        async def read(conn: Any) -> dict[str, int]:
            return {row[0]: row[1] for row in await conn.fetch(_REPLICAS)}

        return await self._store.read(read)

    # The control connection.

    async def _control(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        pg = self._store.asyncpg
        try:
            conn = await pg.connect(
                self._store.dsn,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
                server_settings={"application_name": "dispatch-aio scheduler control"},
            )
            for channel in _CHANNELS:
                await conn.add_listener(channel, self._notified)
        except (Exception, TimeoutError) as exc:
            raise StoreError(
                f"cannot reach the database {self._store.url} to renew leases: {exc}"
            ) from None
        self._conn = conn
        if self._connected_once and self._handlers is not None:
            logger.warning("connected again to the database %s for leases", self._store.url)
            self._handlers.reconnected()
        self._connected_once = True
        return conn

    async def _run(self, work: Awaitable[T]) -> T:
        pg = self._store.asyncpg
        try:
            return await work
        except (pg.PostgresError, pg.InterfaceError, OSError, TimeoutError) as exc:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()
            raise StoreError(f"the lease renewal on {self._store.url} failed: {exc}") from None

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        handlers = self._handlers
        if handlers is None:
            return
        try:
            if channel == "dispatch_calls":
                partition, _, ids = payload.partition(" ")
                handlers.calls(int(partition), ids.split(","))
            elif channel == "dispatch_done":
                handlers.done(payload.split(","))
            elif channel == "dispatch_cancel":
                handlers.cancel(payload)
            elif channel == "dispatch_leases":
                handlers.leases()
            elif channel == "dispatch_events":
                handlers.event(payload)
            elif channel == "dispatch_schedules":
                handlers.schedules()
            elif channel == "dispatch_slots":
                handlers.slots(payload)
        except Exception:
            logger.exception("could not handle the notification %s %r", channel, payload)
