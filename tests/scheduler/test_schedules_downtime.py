"""Schedules after downtime: the missed firings follow each schedule's policy, once.

The schedules run on a clock of the test's own, moved an hour forward between two
starts, on the same database.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf import wrappers_pb2

from dispatch_aio.proto.v1 import schedule_pb2
from dispatch_aio.scheduler import Scheduler, Store
from dispatch_aio.scheduler._schedules import Schedules, firing_key
from dispatch_aio.scheduler.store import CallQuery

from .scripted import API_KEY, FAST_RETRY

POLICIES = {
    "skip": schedule_pb2.MISSED_POLICY_SKIP,
    "once": schedule_pb2.MISSED_POLICY_ONCE,
    "all": schedule_pb2.MISSED_POLICY_ALL,
}


@pytest.mark.parametrize(("missed", "expected"), [("skip", 6), ("once", 7), ("all", 360)])
async def test_missed_firings_after_an_hour_down(
    new_store: Callable[[], Store], missed: str, expected: int
) -> None:
    now = [1_000_000.0]
    spec = schedule_pb2.Schedule(
        id="s", function="job", endpoint="http://127.0.0.1:9", missed=POLICIES[missed]
    )
    spec.interval.FromNanoseconds(10 * 10**9)
    spec.input.Pack(wrappers_pb2.StringValue(value="x"))
    for step in ("create", "after"):
        scheduler = Scheduler(new_store(), api_key=API_KEY, retry=FAST_RETRY)
        await scheduler.start()
        # The scheduler's own schedules run on the wall clock; these on the test's.
        await scheduler.schedules.close()
        engine, store = scheduler._engine, scheduler._store
        assert engine is not None
        schedules = Schedules(engine, store, clock=lambda: now[0])
        await schedules.start()
        try:
            if step == "create":
                await schedules.create(spec)
                now[0] += 3600 + 5  # down for an hour
            else:
                await schedules._fire_due()
                calls = await store.list_calls(CallQuery(parent_id=""))
                (view,) = schedules.list()
        finally:
            await schedules.close()
            await scheduler.close()
    assert len(calls) == expected
    assert view.next_firing.ToNanoseconds() / 1e9 == 1_000_000.0 + 3610
    # Firing again at the same time makes nothing new: the times fired are recorded.
    scheduler = Scheduler(new_store(), api_key=API_KEY, retry=FAST_RETRY)
    await scheduler.start()
    try:
        keys = [firing_key("s", 1_000_000.0 + 3600 - 10 * k) for k in range(6)]
        found = await scheduler._store.find_idempotency_keys(keys, now[0])
        assert len(found) == 6
    finally:
        await scheduler.close()
