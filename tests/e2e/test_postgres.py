"""The scheduler on PostgreSQL, for real: SIGKILLed mid-workload, restarted on its database."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter

import asyncpg
from ports import free_ports

from dispatch_aio import Call, Client
from dispatch_aio._codec import decode_input, decode_value
from dispatch_aio._status import Status
from dispatch_aio.proto.v1 import inspect_pb2

from .conftest import Stack, start_app
from .harness import Starter, start_server
from .test_crash import CALLS_PER_ROOT, UNFINISHED
from .workloads import expected_rounds

ROOTS_FIRST = 12
ROOTS_PER_RESTART = 6
KILLS = 3  # of the scheduler; the app is killed once as well


async def test_no_accepted_call_is_lost_across_scheduler_kills_on_postgres(
    procs: Starter, pg_url: str
) -> None:
    seed = random.randrange(1 << 32)
    print(f"postgres crash test seed: {seed}")
    rng = random.Random(seed)
    app_port, api_port = free_ports(2)
    args = [
        "--port",
        str(api_port),  # the same port at every restart: clients keep their URL
        "--database",
        pg_url,
        "--api-key",
        "crash-test-key",
        "--endpoint",
        f"127.0.0.1:{app_port}",
        "--lease-timeout",  # a killed scheduler's calls wait this long for the next one
        "2",
    ]
    started = time.perf_counter()
    server = start_server(procs, *args)
    assert f"Database:  {pg_url}" in server.proc.out
    stack = Stack(server, start_app(procs, server, app_port), f"http://127.0.0.1:{app_port}")
    accepted: dict[str, int] = {}  # dispatch id -> root number

    async def submit(first: int, count: int) -> None:
        async with Client(
            api_key=stack.server.api_key,
            api_url=stack.server.api_url,
            endpoint_url=stack.endpoint_url,
            env={},
        ) as client:
            calls = [Call("rounds", (i,)) for i in range(first, first + count)]
            ids = await client.dispatch(calls)
        accepted.update(zip(ids, range(first, first + count), strict=True))

    await submit(0, ROOTS_FIRST)
    busy_kills = 0
    for kill in range(KILLS):
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        async with stack.inspect() as inspect:
            request = inspect_pb2.ListCallsRequest(states=UNFINISHED, omit_payloads=True, limit=1)
            busy_kills += bool((await inspect.list_calls(request)).calls)
        # SIGKILL: no chance to finish anything, nor to release its session (the server
        # ends it when the socket closes; the next scheduler takes its partitions once
        # their leases expire).
        stack.server.proc.kill()
        stack.server = start_server(procs, *args)
        await submit(ROOTS_FIRST + kill * ROOTS_PER_RESTART, ROOTS_PER_RESTART)
        if kill == 1:  # and the app, in the middle of its runs
            await asyncio.sleep(rng.uniform(0.1, 0.3))
            stack.app.kill()
            stack.app = start_app(procs, stack.server, app_port)
    assert busy_kills == KILLS  # every kill hit calls in flight, or the test shows nothing

    # Every accepted call finishes with what its function received, in order.
    async with stack.inspect() as inspect:
        for dispatch_id, i in accepted.items():
            info = await inspect.wait_call(dispatch_id, 30)
            assert info.state == inspect_pb2.CALL_STATE_DONE, info
            assert info.status == Status.OK, info
            assert decode_value(info.result.output) == expected_rounds(i)
        calls = await inspect.iter_calls(inspect_pb2.ListCallsRequest(omit_payloads=False))
    print(
        f"postgres crash test: {len(accepted)} roots, {len(calls)} calls, {KILLS} + 1 kills, "
        f"{time.perf_counter() - started:.1f} s"
    )

    # Each poll was recorded once: every root made exactly its calls, with the right
    # inputs, and each finished once with its own result.
    assert len(accepted) == ROOTS_FIRST + KILLS * ROOTS_PER_RESTART
    assert len(calls) == len(accepted) * CALLS_PER_ROOT
    made: dict[str, Counter[str]] = {dispatch_id: Counter() for dispatch_id in accepted}
    for call in calls:
        if call.parent_dispatch_id:
            (tag,), _ = decode_input(call.input)
            assert decode_value(call.result.output) == f"<{tag}>"
            made[call.parent_dispatch_id][str(tag)] += 1
    for dispatch_id, i in accepted.items():
        tags = [tag.strip("<>") for tag in expected_rounds(i)]
        assert made[dispatch_id] == Counter(tags), (i, made[dispatch_id])

    # Stopped cleanly, the database holds no unfinished call and no undelivered result.
    stack.server.proc.send(signal.SIGINT)
    assert stack.server.proc.wait(10) == 0
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM dispatch_calls WHERE phase <> 4") == 0
        assert await conn.fetchval("SELECT count(*) FROM dispatch_results") == 0
        # Stopped, it let its leases go: no partition is held.
        assert await conn.fetchval("SELECT count(*) FROM dispatch_leases WHERE owner <> ''") == 0
    finally:
        await conn.close()
