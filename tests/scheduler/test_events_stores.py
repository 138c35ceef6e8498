"""Durable events on the scheduler, on each kind of store, across a restart of the scheduler.

A call of the reserved wait function is answered by the scheduler itself: these tests
submit such calls directly, so no endpoint is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from google.protobuf import wrappers_pb2

from dispatch_aio._reserved import WAIT_EVENT
from dispatch_aio._status import Status
from dispatch_aio.proto.sdk.v1 import call_pb2
from dispatch_aio.scheduler import Scheduler, Store
from dispatch_aio.scheduler._events import EventAlreadyResolvedError
from dispatch_aio.scheduler.store import Phase

from .scripted import API_KEY, FAST_RETRY

ENDPOINT = "http://127.0.0.1:9"  # never called


def wait_call(key: str, expiration: float = 0.0) -> call_pb2.Call:
    call = call_pb2.Call(function=WAIT_EVENT, endpoint=ENDPOINT)
    call.input.Pack(wrappers_pb2.StringValue(value=key))
    if expiration:
        call.expiration.FromNanoseconds(round(expiration * 1e9))
    return call


def output(result: call_pb2.CallResult) -> str:
    value = wrappers_pb2.StringValue()
    assert result.output.Unpack(value), result
    return value.value


async def started(store: Store) -> Scheduler:
    scheduler = Scheduler(store, api_key=API_KEY, retry=FAST_RETRY)
    await scheduler.start()
    return scheduler


async def test_waiters_survive_a_restart_and_are_woken_in_the_resolving_transaction(
    new_store: Callable[[], Store],
) -> None:
    scheduler = await started(new_store())
    try:
        first, second, timed = await scheduler.dispatch(
            [wait_call("k1"), wait_call("k1"), wait_call("k2", expiration=0.3)]
        )
        done = await asyncio.wait_for(scheduler.wait(timed), 5)
        assert done.error.type == Status.TIMEOUT.proto_name
        assert done.error.message == "the event 'k2' was not sent within 0.3 s"
    finally:
        await scheduler.close()
    scheduler = await started(new_store())  # a restarted scheduler picks the waiters up
    try:
        value = call_pb2.CallResult()
        value.output.Pack(wrappers_pb2.StringValue(value="yes"))
        assert await scheduler.send_event("k1", value) == 2
        for waiter in (first, second):
            assert output(await asyncio.wait_for(scheduler.wait(waiter), 5)) == "yes"
        with pytest.raises(EventAlreadyResolvedError, match="'k1' is already resolved"):
            await scheduler.send_event("k1", value)
        # Resolved before anyone waits: a new waiter finishes at once.
        error = call_pb2.CallResult()
        error.error.type, error.error.message = "Refused", "no"
        assert await scheduler.send_event("k3", error) == 0
        (late,) = await scheduler.dispatch([wait_call("k3")])
        result = await asyncio.wait_for(scheduler.wait(late), 5)
        assert (result.error.type, result.error.message) == ("Refused", "no")
    finally:
        await scheduler.close()
    store = new_store()
    await store.open()
    try:
        # Stored: the events, and every waiter finished.
        assert set(await store.get_events(["k1", "k2", "k3"])) == {"k1", "k3"}
        for waiter in (first, second, timed, late):
            rec = await store.get_call(waiter)
            assert rec is not None and rec.phase is Phase.DONE
    finally:
        await store.close()


async def test_a_waiter_arriving_while_its_event_is_written_is_woken(
    new_store: Callable[[], Store],
) -> None:
    scheduler = await started(new_store())
    try:
        value = call_pb2.CallResult()
        value.output.Pack(wrappers_pb2.StringValue(value="v"))
        calls = [wait_call("race") for _ in range(20)]
        submitted = [asyncio.ensure_future(scheduler.dispatch([c])) for c in calls]
        sent = asyncio.ensure_future(scheduler.send_event("race", value))
        ids = [i for batch in await asyncio.gather(*submitted) for i in batch]
        await sent
        results = await asyncio.wait_for(asyncio.gather(*(scheduler.wait(i) for i in ids)), 5)
        assert [output(r) for r in results] == ["v"] * 20
    finally:
        await scheduler.close()
