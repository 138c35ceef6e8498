"""The engine knows which calls have a Run request in flight, without a query."""

from __future__ import annotations

import asyncio

from .scripted import ScriptedEndpoint
from .test_store_failures import MakeScheduler, finished, gated_calls


async def test_running_lists_the_calls_in_flight(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler
) -> None:
    s = await make_scheduler()
    gate = asyncio.Event()
    ids = await gated_calls(s, endpoint, gate)
    assert sorted(s.running()) == sorted(ids)
    gate.set()
    await finished(s, ids, 10)
    assert s.running() == []
