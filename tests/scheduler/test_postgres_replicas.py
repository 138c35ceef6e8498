"""Several schedulers on one PostgreSQL database: leases, fencing, wake-ups between them."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from google.protobuf import wrappers_pb2

from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2
from dispatch_aio.proto.v1 import schedule_pb2
from dispatch_aio.scheduler import PostgresStore, Scheduler
from dispatch_aio.scheduler.store import (
    CallQuery,
    Fence,
    FencedError,
    InsertCall,
    KeyTakenError,
    Phase,
    PutIdempotencyKey,
    UpdateCall,
)
from dispatch_aio.scheduler.store._coordination import (
    PARTITIONS,
    Coordination,
    Handlers,
    partition_of,
)

from .scripted import ScriptedEndpoint, call, eventually, ok, unpack_text
from .test_events_stores import wait_call
from .test_store_contract import record

MakeScheduler = Callable[..., Awaitable[Scheduler]]


def quiet() -> Handlers:
    return Handlers(
        calls=lambda p, ids: None,
        done=lambda ids: None,
        cancel=lambda i: None,
        leases=lambda: None,
        reconnected=lambda: None,
        event=lambda key: None,
        schedules=lambda: None,
        slots=lambda function: None,
    )


def root_in(partition: int, prefix: str = "r") -> str:
    """A root dispatch id that hashes to `partition`."""
    n = 0
    while partition_of(f"{prefix}{n}") != partition:
        n += 1
    return f"{prefix}{n}"


async def shared(coordination: Coordination, expected: dict[str, int], seconds: float) -> None:
    """Wait until the live replicas hold `expected` partitions each."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    for _ in itertools.count():
        found = await coordination.replicas()
        if found == expected:
            return
        assert loop.time() < deadline, found
        await asyncio.sleep(0.05)


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[tuple[PostgresStore, Coordination]]]:
    opened: list[tuple[PostgresStore, Coordination]] = []
    for name in ("a", "b"):
        store = PostgresStore(pg_url, replica=name)
        await store.open()
        coordination = store.coordination()
        opened.append((store, coordination))
    yield opened
    for store, coordination in opened:
        await coordination.stop()
        await store.close()


async def test_the_partition_of_a_root_is_the_same_in_python_and_in_the_database(
    stores: list[tuple[PostgresStore, Coordination]], pg_url: str
) -> None:
    store = stores[0][0]
    ids = [f"{i:032x}" for i in range(1000)] + ["é-root", "x"]
    await store.write([InsertCall(record(i)) for i in ids])
    conn = await asyncpg.connect(pg_url)
    try:
        rows = dict(await conn.fetch("SELECT id, partition FROM dispatch_calls"))
    finally:
        await conn.close()
    assert rows == {i: partition_of(i) for i in ids}
    assert set(rows.values()) == set(range(PARTITIONS))  # 1000 ids reach every partition


async def test_a_replica_whose_lease_was_taken_cannot_commit(
    stores: list[tuple[PostgresStore, Coordination]], pg_url: str
) -> None:
    (a, lease_a), (b, lease_b) = stores
    await lease_a.start(quiet(), 30.0)
    held_a = (await lease_a.renew()).held
    assert sorted(held_a) == list(range(PARTITIONS))  # alone: every partition
    taken, kept = root_in(0), root_in(63)
    await a.write([Fence(0, "a", held_a[0]), InsertCall(record(taken))])

    # a stops renewing (paused, cut off): its leases expire and b takes its share.
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE dispatch_leases SET expires_at = now() - interval '1 s'")
    finally:
        await conn.close()
    await lease_b.start(quiet(), 30.0)
    leases_b = await lease_b.renew()
    assert leases_b.replicas == 2 and leases_b.share == PARTITIONS // 2
    assert sorted(leases_b.held) == list(range(PARTITIONS // 2))  # the free ones, in order
    assert leases_b.held[0] == held_a[0] + 1  # a new epoch

    # a's writes to a partition b took fail whole, alone among concurrent ones; a write
    # to a partition nobody took yet still commits.
    done = record(taken, phase=Phase.DONE, status=1)
    fenced, fine = await asyncio.gather(
        a.write([Fence(0, "a", held_a[0]), UpdateCall(done), InsertCall(record("lost"))]),
        a.write([Fence(63, "a", held_a[63]), InsertCall(record(kept))]),
        return_exceptions=True,
    )
    assert isinstance(fenced, FencedError), fenced
    assert "no longer holds partition 0" in str(fenced)
    assert fine is None
    assert (await a.get_call(taken)).phase is Phase.PENDING  # type: ignore[union-attr]
    assert await a.get_call("lost") is None
    assert await a.get_call(kept) is not None
    # b writes with its own epoch.
    await b.write([Fence(0, "b", leases_b.held[0]), UpdateCall(done)])
    assert (await b.get_call(taken)).phase is Phase.DONE  # type: ignore[union-attr]

    # a renews: it keeps what nobody took (renewed, same epoch) and no more than its share.
    leases_a = await lease_a.renew()
    assert sorted(leases_a.held) == list(range(PARTITIONS // 2, PARTITIONS))
    assert leases_a.held[63] == held_a[63]
    assert await lease_a.replicas() == {"a": 32, "b": 32}


async def test_a_lease_held_by_a_write_in_flight_is_taken_only_after_it(
    stores: list[tuple[PostgresStore, Coordination]], pg_url: str
) -> None:
    (_, lease_a), (_, lease_b) = stores
    await lease_a.start(quiet(), 30.0)
    held = (await lease_a.renew()).held
    conn = await asyncpg.connect(pg_url)
    try:
        # A transaction of a that passed its fence and has not committed yet.
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT dispatch_fence(5, 'a', $1)", held[5])
        await conn.execute("UPDATE dispatch_leases SET expires_at = now() - interval '1 s'")
        await tx.commit()
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT dispatch_fence(5, 'a', $1)", held[5])
        await lease_b.start(quiet(), 30.0)
        taken = (await lease_b.renew()).held
        assert 5 not in taken and len(taken) == PARTITIONS // 2  # skipped while in flight
        await tx.commit()
    finally:
        await conn.close()
    await lease_b.release(list(taken))
    assert 5 in (await lease_b.renew()).held


async def test_replicas_share_the_partitions_and_take_over_those_let_go(
    pg_url: str, make_scheduler: MakeScheduler
) -> None:
    first = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    second = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    store = second._store
    assert isinstance(store, PostgresStore)
    coordination = store.coordination()

    await shared(coordination, {"one": 32, "two": 32}, 5)
    await first.close()  # lets its leases go: taken at once, not after they expire
    await shared(coordination, {"two": 64}, 1.5)


async def test_any_replica_takes_submissions_results_and_cancellations(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    block = asyncio.Event()

    async def echo(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if unpack_text(req.input) == "block":
            await block.wait()
        return ok(unpack_text(req.input) + "!")

    endpoint.on("echo", echo)
    one = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    two = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    store = one._store
    assert isinstance(store, PostgresStore)
    await shared(store.coordination(), {"one": 32, "two": 32}, 5)

    # Submitted to one, each call runs once, on the replica holding its partition;
    # its result is there on both.
    ids = await one.dispatch([call("echo", str(i), endpoint=endpoint.url) for i in range(20)])
    async with asyncio.timeout(10):
        for s in (one, two):
            assert [unpack_text((await s.wait(i)).output) for i in ids] == [
                f"{i}!" for i in range(20)
            ]
    assert sorted(len(endpoint.for_id(i)) for i in ids) == [1] * 20
    held = one._engine._parts.owned  # type: ignore[union-attr]
    assert {partition_of(i) in held for i in ids} == {True, False}  # both replicas ran some

    # Cancelled through the replica that does not drive it.
    blocked = (await one.dispatch([call("echo", "block", endpoint=endpoint.url)]))[0]
    await endpoint.wait_for(lambda: len(endpoint.for_id(blocked)) == 1)
    other = two if partition_of(blocked) in held else one
    async with asyncio.timeout(10):
        assert await other.cancel(blocked) == 1
        result = await other.wait(blocked)
    assert result.error.type == "dispatch_aio.CancelledCallError"
    block.set()


async def test_a_frozen_replica_is_fenced_off_and_its_calls_go_on_elsewhere(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    runs: dict[str, int] = {}

    async def echo(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        runs[req.dispatch_id] = runs.get(req.dispatch_id, 0) + 1
        return ok(unpack_text(req.input) + "!")

    endpoint.on("echo", echo)
    one = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    parts = one._engine._parts  # type: ignore[union-attr]
    assert parts is not None and len(parts.owned) == PARTITIONS
    # one stops renewing its leases (frozen, as far as the others can tell), but goes
    # on believing it holds them: another replica takes them once they expire.
    assert parts._keeper is not None
    parts._keeper.cancel()
    two = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    parts_two = two._engine._parts  # type: ignore[union-attr]
    assert parts_two is not None
    await eventually(lambda: len(parts_two.owned) == PARTITIONS, 5)

    # Submitted to one: it runs them too, but cannot record any outcome.
    ids = await one.dispatch([call("echo", str(i), endpoint=endpoint.url) for i in range(5)])
    async with asyncio.timeout(5):
        assert [unpack_text((await two.wait(i)).output) for i in ids] == [f"{i}!" for i in range(5)]
        assert [unpack_text((await one.wait(i)).output) for i in ids] == [f"{i}!" for i in range(5)]
    await eventually(lambda: not {partition_of(i) for i in ids} & set(parts.owned), 3)
    assert not one._engine._live  # its fenced calls were dropped
    assert all(1 <= runs[i] <= 2 for i in ids)


async def test_a_call_announced_back_before_its_submission_returns_runs_once(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    # A replica hears its own announcements too; one may arrive, and the call be loaded,
    # before the submission's write returns: the call is driven once all the same.
    endpoint.on("echo", lambda req: ok(unpack_text(req.input)))
    s = await make_scheduler(PostgresStore(pg_url), lease_timeout=0.9)
    submissions = [s.dispatch([call("echo", str(i), endpoint=endpoint.url)]) for i in range(100)]
    ids = [i for found in await asyncio.gather(*submissions) for i in found]
    async with asyncio.timeout(10):
        for i in ids:
            await s.wait(i)
    await asyncio.sleep(0.2)  # a second run would show by now
    assert [len(endpoint.for_id(i)) for i in ids] == [1] * len(ids)
    assert s.unfinished == 0


async def test_one_key_submitted_to_both_replicas_at_once_makes_one_call(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    endpoint.on("echo", lambda req: ok(unpack_text(req.input)))
    one = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    two = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    for n in range(20):
        submitted = [
            s.dispatch([call("echo", str(n), endpoint=endpoint.url)], idempotency_keys=[f"k{n}"])
            for s in (one, two)
        ]
        first, second = await asyncio.gather(*submitted)
        assert first == second, n
    store = one._store
    assert len(await store.list_calls(CallQuery())) == 20


async def test_a_live_key_of_another_call_is_not_replaced(
    stores: list[tuple[PostgresStore, Coordination]],
) -> None:
    (a, _), (b, _) = stores
    far = time.time() + 3600
    await a.write([PutIdempotencyKey("k", "a1", far)])
    with pytest.raises(KeyTakenError, match="idempotency key k is held by another call"):
        await b.write([InsertCall(record("b1")), PutIdempotencyKey("k", "b1", far)])
    assert await b.get_call("b1") is None
    assert await b.find_idempotency_keys(["k"], time.time()) == {"k": "a1"}
    await b.write([PutIdempotencyKey("k", "a1", far + 1)])  # its own call's key: kept
    await a.write([PutIdempotencyKey("old", "a2", 10.0)])
    await b.write([PutIdempotencyKey("old", "b2", far)])  # an expired key is replaced
    assert await b.find_idempotency_keys(["old"], time.time()) == {"old": "b2"}


async def test_a_replica_cut_off_from_the_database_stops_before_its_leases_expire(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    endpoint.on("echo", lambda req: ok(unpack_text(req.input) + "!"))
    s = await make_scheduler(PostgresStore(pg_url), lease_timeout=2.0)
    parts = s._engine._parts  # type: ignore[union-attr]
    assert parts is not None and len(parts.owned) == PARTITIONS
    name = urlsplit(pg_url).path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(urlsplit(pg_url)._replace(path="/postgres")))
    try:
        # Its lease connection is cut, and no new connection is let in.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        control = parts._coord._conn  # type: ignore[attr-defined]
        await admin.execute("SELECT pg_terminate_backend($1, 5000)", control.get_server_pid())
        cut = asyncio.get_running_loop().time()
        await eventually(lambda: not parts.owned, 3)
        # It let go before another replica could take them (2 s after the last renewal).
        assert asyncio.get_running_loop().time() - cut < 2.0
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await eventually(lambda: len(parts.owned) == PARTITIONS, 5)  # and took them back
        (dispatch_id,) = await s.dispatch([call("echo", "back", endpoint=endpoint.url)])
        async with asyncio.timeout(5):
            assert unpack_text((await s.wait(dispatch_id)).output) == "back!"
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_an_event_sent_to_one_replica_reaches_the_waiters_the_other_drives(
    pg_url: str, make_scheduler: MakeScheduler
) -> None:
    one = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    two = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    store = one._store
    assert isinstance(store, PostgresStore)
    await shared(store.coordination(), {"one": 32, "two": 32}, 5)
    ids = await one.dispatch([wait_call("approval") for _ in range(16)])
    held = one._engine._parts.owned  # type: ignore[union-attr]
    assert {partition_of(i) in held for i in ids} == {True, False}  # both replicas wait
    await eventually(lambda: one._engine.event_waiters + two._engine.event_waiters == 16)

    value = call_pb2.CallResult()
    value.output.Pack(wrappers_pb2.StringValue(value="yes"))
    here = two._engine.event_waiters
    assert 0 < here < 16
    assert await two.send_event("approval", value) == here  # the others are one's
    async with asyncio.timeout(10):
        for i in ids:
            result = await one.wait(i)
            assert unpack_text(result.output) == "yes", result
    # Sent to both replicas at once: one resolves it, the other says it was resolved.
    outcomes = await asyncio.gather(
        one.send_event("race", value), two.send_event("race", value), return_exceptions=True
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["EventAlreadyResolvedError", "int"]


async def test_replicas_share_the_schedules_and_fire_each_time_once(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    fired: list[float] = []

    async def tick(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        fired.append(time.time())
        return ok("done")

    endpoint.on("tick", tick)
    one = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    two = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    spec = schedule_pb2.Schedule(id="every-second", function="tick", endpoint=endpoint.url)
    spec.interval.FromNanoseconds(10**9)
    created = time.time()
    await one.schedules.create(spec)
    # The other replica hears of it, fires it too, and may pause it.
    await eventually(lambda: [s.id for s in two.schedules.list()] == ["every-second"])
    await eventually(lambda: len(fired) >= 3, seconds=10)
    await one.close()  # the replica that made it is gone: the other fires it still
    count = len(fired)
    await eventually(lambda: len(fired) >= count + 2, seconds=10)
    await two.schedules.pause("every-second")
    paused_at = time.time()
    paused = len(fired)
    await asyncio.sleep(2.5)
    assert len(fired) <= paused + 1  # at most a firing in flight during the pause
    calls = await two._store.list_calls(CallQuery(parent_id=""))
    assert len(calls) == len(fired)  # each call ran once
    # Each firing time made one call, whichever replicas fired it: one call per second
    # at most (two replicas each making their own would make about two).
    assert len(calls) <= (paused_at - created) + 2, (len(calls), paused_at - created)


async def test_a_function_limited_to_2_never_runs_3_across_replicas(
    pg_url: str, make_scheduler: MakeScheduler, endpoint: ScriptedEndpoint
) -> None:
    running = 0
    peak = 0

    async def limited(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1)
        running -= 1
        return ok("done")

    endpoint.on("limited", limited)
    one = await make_scheduler(PostgresStore(pg_url, replica="one"), lease_timeout=0.9)
    two = await make_scheduler(PostgresStore(pg_url, replica="two"), lease_timeout=0.9)
    store = one._store
    assert isinstance(store, PostgresStore)
    await shared(store.coordination(), {"one": 32, "two": 32}, 5)
    calls = [call("limited", str(i), endpoint=endpoint.url) for i in range(16)]
    for c in calls:
        c.policy.concurrency = 2
    ids = await one.dispatch(calls)
    held = one._engine._parts.owned  # type: ignore[union-attr]
    assert {partition_of(i) in held for i in ids} == {True, False}  # both replicas run some
    async with asyncio.timeout(30):
        for i in ids:
            assert unpack_text((await two.wait(i)).output) == "done"
    assert peak == 2  # the two replicas together, never more
