"""The `Store` contract, on every kind of store: records, queues, atomic and batched writes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import pytest

from dispatch_aio.scheduler import PostgresStore, SQLiteStore, Store, StoreError
from dispatch_aio.scheduler.store import (
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
    Handlers,
    InsertCall,
    KeyTakenError,
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


def commits(store: Store) -> int:
    assert isinstance(store, SQLiteStore | PostgresStore)
    return store.commits


async def test_records_round_trip(store: Store) -> None:
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
        policy=b"\x18\x02",  # a serialized FunctionPolicy: concurrency 2
    )
    await store.write([InsertCall(full)])
    assert await store.get_call("a") == full
    done = full._replace(
        phase=Phase.DONE,
        result=b"res",
        finished_at=9.0,
        status=1,
        divergences=2,
        version="2.1",  # a tail call may change it
        policy=b"",  # and the policy, to that of its new function
    )
    await store.write([UpdateCall(done)])
    assert await store.get_call("a") == done
    assert await store.get_call("missing") is None


async def test_load_returns_unfinished_calls_and_their_queues(store: Store) -> None:
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


async def test_a_result_queued_and_delivered_in_one_write_is_neither(store: Store) -> None:
    # As a chain step writes: the child's result queued, and delivered to its caller.
    await store.write([InsertCall(record("p", phase=Phase.SUSPENDED))])
    await store.write([AddResult(QueuedResult(1, "p", 0, b"r1")), RemoveResults((1,))])
    assert (await store.load()).results == []
    # Removed before it is queued: it stays queued.
    await store.write([RemoveResults((2,)), AddResult(QueuedResult(2, "p", 0, b"r2"))])
    assert [r.seq for r in (await store.load()).results] == [2]
    # In writes committed together, as in one.
    await asyncio.gather(
        store.write([AddResult(QueuedResult(3, "p", 0, b"r3"))]),
        store.write([RemoveResults((2, 3))]),
    )
    assert (await store.load()).results == []
    # Removed, queued again and removed in one write: gone, as one by one.
    await store.write([AddResult(QueuedResult(9, "p", 0, b"r9"))])
    again = AddResult(QueuedResult(9, "p", 0, b"r9 again"))
    await store.write([RemoveResults((9,)), again, RemoveResults((9,))])
    assert (await store.load()).results == []
    # A seq queued twice fails the write, as it would alone.
    with pytest.raises(StoreError):
        await store.write(
            [
                AddResult(QueuedResult(4, "p", 0, b"r4")),
                AddResult(QueuedResult(4, "p", 0, b"r4")),
                RemoveResults((4,)),
            ]
        )
    assert (await store.load()).results == []


async def test_fences_and_announcements(store: Store) -> None:
    coordination = store.coordination()
    ops = [Fence(0, "r", 1), Announce(0, ("a",)), InsertCall(record("a"))]
    if coordination is None:  # one scheduler per store: nothing to fence, nobody to wake
        await store.write(ops)
        assert await store.get_call("a") is not None
        return
    with pytest.raises(FencedError):  # no lease held
        await store.write(ops)
    assert await store.get_call("a") is None
    heard: list[tuple[int, list[str]]] = []
    woken = asyncio.Event()

    def calls(partition: int, ids: list[str]) -> None:
        heard.append((partition, ids))
        woken.set()

    ignore = lambda *args: None  # noqa: E731
    await coordination.start(
        Handlers(calls, ignore, ignore, ignore, ignore, ignore, ignore, ignore), 30.0
    )
    try:
        leases = await coordination.renew()
        epoch = leases.held[0]
        await store.write([Fence(0, coordination.replica, epoch), *ops[1:]])
        assert await store.get_call("a") is not None
        async with asyncio.timeout(5):
            await woken.wait()
        assert heard == [(0, ["a"])]
    finally:
        await coordination.stop()


async def test_list_calls_filters_and_pages(store: Store) -> None:
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
    assert await ids(phases=(Phase.PENDING, Phase.SUSPENDED), parent_id="") == ["r2"]
    assert await ids(phases=(Phase.SUSPENDED,), root_id="r1", parent_id="r1") == ["k2"]
    assert await ids(phases=(Phase.DONE, Phase.PENDING), parent_id="") == ["r1", "r2"]
    assert await ids(phases=(Phase.PENDING,), newest_first=True, limit=1) == ["r2"]
    assert await ids(statuses=(7,)) == ["k1"]
    first = await store.list_calls(CallQuery(limit=2))
    assert [r.id for _, r in first] == ["r1", "k1"]
    assert await ids(after=first[-1][0]) == ["k2", "r2"]
    assert await ids(root_id="r1", parent_id="r1", after=first[-1][0], limit=1) == ["k2"]
    # The newest first, paging back with `before`.
    newest = await store.list_calls(CallQuery(newest_first=True, limit=2))
    assert [r.id for _, r in newest] == ["r2", "k2"]
    assert await ids(newest_first=True, before=newest[-1][0]) == ["k1", "r1"]
    assert await ids(newest_first=True, parent_id="", before=newest[0][0]) == ["r1"]
    assert await ids(before=newest[-1][0]) == ["r1", "k1"]
    assert await store.count_children(["r1", "r2", "k1"]) == {"r1": 2}
    assert await store.count_children([]) == {}


async def test_a_write_is_atomic(store: Store) -> None:
    await store.write([InsertCall(record("a"))])
    with pytest.raises(StoreError, match=r"(?i)unique"):
        await store.write([InsertCall(record("b")), InsertCall(record("a"))])
    assert await store.get_call("b") is None


async def test_concurrent_writes_share_commits_and_fail_alone(store: Store) -> None:
    await store.write([InsertCall(record("dup"))])
    before = commits(store)
    writes = [store.write([InsertCall(record(f"c{i}"))]) for i in range(200)]
    writes.insert(100, store.write([InsertCall(record("dup"))]))
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert isinstance(outcomes[100], StoreError)
    assert [o for i, o in enumerate(outcomes) if i != 100] == [None] * 200
    assert len(await store.list_calls(CallQuery())) == 201
    # 200 writes issued together: grouped into a handful of transactions.
    assert commits(store) - before < 10


async def test_meta_values(store: Store) -> None:
    assert await store.get_meta("k") is None
    await store.write([SetMeta("k", b"v1")])
    await store.write([SetMeta("k", b"v2")])
    assert await store.get_meta("k") == b"v2"
    # keep: the first value stored stays (replicas starting together each make a key).
    await store.write([SetMeta("k", b"v3", keep=True), SetMeta("n", b"new", keep=True)])
    assert await store.get_meta("k") == b"v2"
    assert await store.get_meta("n") == b"new"


async def test_journal_segments(store: Store) -> None:
    assert store.keeps_segments
    assert await store.read_segments("a") == []
    await store.write([InsertCall(record("a")), AppendSegment("a", 2, b"two")])
    await store.write([AppendSegment("a", 1, b"one"), AppendSegment("b", 1, b"other")])
    assert await store.read_segments("a") == [b"one", b"two"]
    with pytest.raises(StoreError):  # a round is appended once
        await store.write([AppendSegment("a", 2, b"again")])
    await store.write([RemoveSegments("a")])
    assert await store.read_segments("a") == []
    assert await store.read_segments("b") == [b"other"]


async def test_data_survives_reopening(new_store: Callable[[], Store]) -> None:
    first = new_store()
    await first.open()
    await first.write([InsertCall(record("a")), AddResult(QueuedResult(1, "a", 0, b"r"))])
    await first.close()
    second = new_store()
    await second.open()
    try:
        snapshot = await second.load()
        assert [c.id for c in snapshot.calls] == ["a"]
        assert [r.result for r in snapshot.results] == [b"r"]
        assert snapshot.next_seq == 2
    finally:
        await second.close()


async def test_a_second_scheduler_shares_the_database_only_if_the_store_coordinates(
    store: Store, new_store: Callable[[], Store]
) -> None:
    other = new_store()
    if store.coordination() is None:  # SQLite: one scheduler per file
        with pytest.raises(StoreError, match=r"in use by another process"):
            await other.open()
    else:  # PostgreSQL: replicas share it, each driving the partitions it holds
        await other.open()
        try:
            await other.write([InsertCall(record("b"))])
        finally:
            await other.close()
        assert await store.get_call("b") is not None
    # The first one is unaffected.
    await store.write([InsertCall(record("a"))])


async def test_writing_to_a_closed_store_fails(new_store: Callable[[], Store]) -> None:
    store = new_store()
    with pytest.raises(StoreError, match="not open"):
        await store.write([InsertCall(record("a"))])
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.write([InsertCall(record("a"))])


async def test_idempotency_keys_expire_and_are_pruned(store: Store) -> None:
    await store.write([InsertCall(record("a")), PutIdempotencyKey("k1", "a", expires_at=50.0)])
    await store.write([PutIdempotencyKey("k2", "b", expires_at=10.0)])
    assert await store.find_idempotency_keys(["k1", "k2", "k3"], now=5.0) == {
        "k1": "a",
        "k2": "b",
    }
    # Expired keys are not found, even before they are pruned.
    assert await store.find_idempotency_keys(["k1", "k2"], now=20.0) == {"k1": "a"}
    assert await store.find_idempotency_keys([], now=0.0) == {}
    await store.write([PruneIdempotencyKeys(before=20.0)])
    assert await store.find_idempotency_keys(["k2"], now=0.0) == {}
    # An expired key may be given to a new call.
    await store.write([PutIdempotencyKey("k1", "c", expires_at=90.0)])
    assert await store.find_idempotency_keys(["k1"], now=60.0) == {"k1": "c"}


async def test_a_live_key_of_another_call_fails_the_write(store: Store) -> None:
    # What a submission sent again meets: its key was stored with its first call.
    now = time.time()
    far = now + 3600
    await store.write([InsertCall(record("a")), PutIdempotencyKey("k", "a", far, now=now)])
    with pytest.raises(KeyTakenError, match="idempotency key k is held by another call"):
        await store.write([InsertCall(record("b")), PutIdempotencyKey("k", "b", far, now=now)])
    assert await store.get_call("b") is None
    assert await store.find_idempotency_keys(["k"], now) == {"k": "a"}
    await store.write([PutIdempotencyKey("k", "a", far + 1, now=now)])  # its own call's key
    # Writes grouped with the refused one still commit.
    await asyncio.gather(
        store.write([InsertCall(record("c"))]),
        asyncio.gather(
            store.write([InsertCall(record("d")), PutIdempotencyKey("k", "d", far, now=now)]),
            return_exceptions=True,
        ),
    )
    assert await store.get_call("c") is not None
    assert await store.get_call("d") is None
    await store.write([PutIdempotencyKey("old", "a", 10.0, now=now)])
    await store.write([PutIdempotencyKey("old", "b", far, now=now)])  # expired: replaced
    assert await store.find_idempotency_keys(["old"], now) == {"old": "b"}


async def test_events_are_resolved_once_with_their_waiters(store: Store) -> None:
    waiter = record("w", function="dispatch_aio.wait_event")
    await store.write([InsertCall(waiter)])
    done = waiter._replace(phase=Phase.DONE, result=b"value")
    await store.write([PutEvent("order-1", b"value", 3.0), UpdateCall(done)])
    assert await store.get_events(["order-1", "order-2"]) == {"order-1": b"value"}
    assert await store.get_events([]) == {}
    # Resolving again fails the whole write: the waiter update with it is not applied.
    again = done._replace(last_error="changed")
    with pytest.raises(StoreError):
        await store.write([UpdateCall(again), PutEvent("order-1", b"other", 4.0)])
    assert await store.get_events(["order-1"]) == {"order-1": b"value"}
    stored = await store.get_call("w")
    assert stored is not None and stored.last_error == ""
    many = [f"k{i}" for i in range(1200)]  # more keys than one SQL statement takes
    await store.write([PutEvent(key, key.encode(), 5.0) for key in many])
    found = await store.get_events(many)
    assert len(found) == 1200 and found["k1199"] == b"k1199"


async def test_schedules_are_kept_replaced_and_deleted(store: Store) -> None:
    first = ScheduleRecord("s1", b"spec-1", next_at=10.5, paused=False, created_at=1.0)
    second = ScheduleRecord("s2", b"spec-2", next_at=20.0, paused=True, created_at=2.0)
    await store.write([PutSchedule(second), PutSchedule(first)])
    assert await store.list_schedules() == [first, second]
    moved = dataclasses.replace(first, next_at=11.5, paused=True)
    await store.write([PutSchedule(moved)])
    assert await store.list_schedules() == [moved, second]
    await store.write([DeleteSchedule("s2"), DeleteSchedule("none")])
    assert await store.list_schedules() == [moved]


async def test_attempts_are_kept_in_order_with_the_change_they_made(store: Store) -> None:
    assert await store.list_attempts("a") == []
    first = AttemptRecord("a", 1, 10.0, 10.5, 14, "connection refused by 127.0.0.1:8000")
    second = AttemptRecord("a", 2, 12.0, 12.25, 0, "suspended, made 2 calls \u2713\x00")
    await store.write([InsertCall(record("a")), AddAttempt(first)])
    await store.write([UpdateCall(record("a", attempts=2)), AddAttempt(second)])
    await store.write([InsertCall(record("b")), AddAttempt(AttemptRecord("b", 1, 1, 2, 0, "ok"))])
    attempts = await store.list_attempts("a")
    assert [a.number for a in attempts] == [1, 2]
    assert attempts[0] == first
    assert attempts[1].outcome.startswith("suspended, made 2 calls \u2713")
    assert (attempts[1].started_at, attempts[1].finished_at) == (12.0, 12.25)
    # Written atomically with the call's change: a failed write records no attempt.
    with pytest.raises(StoreError):
        await store.write(
            [AddAttempt(AttemptRecord("a", 3, 13, 14, 0, "x")), InsertCall(record("a"))]
        )
    assert len(await store.list_attempts("a")) == 2
