"""A durable call whose awaiting task is cancelled is cancelled at the scheduler.

The embedded scheduler on a real SQLite file; the calls are then listed with the
inspection service's ``cancelled`` filter, as ``dispatch-aio calls --status cancelled``
does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispatch_aio import Dispatch
from dispatch_aio._datadir import read_connection
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.errors import CancelledCallError, PermanentError
from dispatch_aio.proto.v1 import inspect_pb2


async def _list(data_dir: Path, **filters: object) -> list[inspect_pb2.CallInfo]:
    found = read_connection(str(data_dir))
    assert found is not None
    async with InspectClient(*found) as inspect:
        request = inspect_pb2.ListCallsRequest(**filters)  # type: ignore[arg-type]
        return list(await inspect.iter_calls(request))


async def test_cancelling_the_awaiting_task_cancels_the_call(tmp_path: Path) -> None:
    app = Dispatch(env={}, data_dir=str(tmp_path))
    seen: list[str] = []

    @app.function
    async def slow(tag: str) -> str:
        seen.append(f"{tag} started")
        try:
            await asyncio.sleep(3600)  # a durable timer: the call suspends
        except asyncio.CancelledError:
            seen.append(f"{tag} cancelled")
            raise
        return "slept"

    @app.function
    async def gives_up() -> str:
        try:
            return await asyncio.wait_for(slow("waited"), timeout=0.3)
        except TimeoutError:
            return "gave up"  # the run ends: its Exit names the call abandoned

    @app.function
    async def cancels_a_task() -> str:
        task = asyncio.create_task(slow("task"))
        await asyncio.sleep(1.2)  # suspended: the call is made
        task.cancel()
        await asyncio.sleep(1.2)  # suspended again: this Poll names it abandoned
        return "cancelled it"

    @app.function
    async def reject() -> None:
        raise PermanentError("no")  # a permanent error that is not a cancellation

    async with await app.start():
        first = await gives_up.dispatch()
        second = await cancels_a_task.dispatch()
        rejected = await reject.dispatch()
        assert await app.client.result(first, timeout=10) == "gave up"
        assert await app.client.result(second, timeout=10) == "cancelled it"
        with pytest.raises(PermanentError):
            await app.client.result(rejected, timeout=10)
        children = [c for c in await _list(tmp_path, top_level_only=False) if c.parent_dispatch_id]
        assert sorted(c.parent_dispatch_id for c in children) == sorted([first, second])
        for child in children:
            with pytest.raises(CancelledCallError):
                await app.client.result(child.dispatch_id, timeout=10)
        cancelled = await _list(tmp_path, cancelled=True)
        assert {c.dispatch_id for c in cancelled} == {c.dispatch_id for c in children}
    assert sorted(seen) == ["task cancelled", "task started", "waited cancelled", "waited started"]
