"""DurableLoop internals: hashing of tasks and futures, and teardown."""

from __future__ import annotations

import asyncio

import pytest

from dispatch_aio.durable import Clock, DurableLoop
from dispatch_aio.durable._loop import _HASH_SHIFT, DurableFuture


@pytest.mark.parametrize("count", [3, 8, 100, 5000])
async def test_set_order_does_not_depend_on_the_hash_base(count: int) -> None:
    """Sets of a run's futures iterate in the same order whatever the loop's random base."""
    host = asyncio.get_running_loop()
    orders = []
    for base in (0, 1, 77, 4095):
        loop = DurableLoop(host, Clock(), 0.0)
        loop._hash_base = base << _HASH_SHIFT
        futures: list[DurableFuture[None]] = [DurableFuture(loop=loop) for _ in range(count)]
        # Half of them, as asyncio.wait() builds sets of what it is given.
        chosen = set(futures[::2]) | set(futures[count // 3 :: 3])
        orders.append([futures.index(f) for f in chosen])
    assert orders[0] == orders[1] == orders[2] == orders[3]


async def test_runs_do_not_share_hashes() -> None:
    host = asyncio.get_running_loop()
    hashes = {hash(DurableFuture(loop=DurableLoop(host, Clock(), 0.0))) for _ in range(50)}
    assert len(hashes) > 40  # distinct random bases, apart from rare coincidences


async def test_teardown_cancels_only_its_own_tasks() -> None:
    host = asyncio.get_running_loop()
    loop = DurableLoop(host, Clock(), 0.0)
    other = DurableLoop(host, Clock(), 0.0)

    async def forever() -> None:
        await asyncio.Event().wait()

    mine = loop.create_root_task(forever())
    theirs = other.create_root_task(forever())
    loop.step()
    other.step()
    await loop.teardown()
    assert mine.cancelled()
    assert not theirs.done()
    await other.teardown()
    assert theirs.cancelled()


async def test_async_generators_are_finalized_on_the_durable_loop() -> None:
    host = asyncio.get_running_loop()
    loop = DurableLoop(host, Clock(), 0.0)
    closed_on: list[asyncio.AbstractEventLoop] = []

    async def numbers():  # type: ignore[no-untyped-def]
        try:
            for i in range(10):
                yield i
        finally:
            closed_on.append(asyncio.get_running_loop())

    async def take_one_and_drop() -> int:
        gen = numbers()
        first = await gen.__anext__()
        del gen  # unfinished: finalized when collected
        return first

    async def keep_one_open() -> None:
        gen = numbers()
        await gen.__anext__()
        await asyncio.Event().wait()  # never ends; teardown closes it

    task = loop.create_root_task(take_one_and_drop())
    loop.step()
    loop.step()
    assert task.result() == 0
    assert closed_on == [loop]

    loop.create_root_task(keep_one_open())
    loop.step()
    await loop.teardown()
    assert closed_on == [loop, loop]
