"""Cancellation through a Dispatch object's client, on its embedded scheduler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispatch_aio import Dispatch
from dispatch_aio._datadir import read_connection
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.errors import CancelledCallError, ClientError
from dispatch_aio.proto.v1 import inspect_pb2


async def test_cancel_a_suspended_call_and_its_child(tmp_path: Path) -> None:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))
    started: list[str] = []

    @dispatch.function
    async def sleeper(name: str) -> None:
        started.append(name)
        await asyncio.sleep(3600)  # a durable timer: the call is suspended

    @dispatch.function
    async def parent() -> str:
        try:
            await sleeper("child")
        except CancelledCallError as exc:
            return f"child cancelled: {exc}"
        return "child finished"

    @dispatch.function
    async def tree() -> None:
        await asyncio.gather(sleeper("a"), sleeper("b"))

    async with await dispatch.start():
        client = dispatch.client
        # A child cancelled on its own: its parent receives the error.
        parent_id = await parent.dispatch()
        async with asyncio.timeout(10):
            while "child" not in started:  # noqa: ASYNC110 - set by a durable function
                await asyncio.sleep(0.01)
        (child,) = await _children(tmp_path, parent_id)
        assert await client.cancel(child) is True
        assert (await client.result(parent_id, timeout=10)).startswith("child cancelled: call ")
        # A tree: the root and both children stop.
        tree_id = await tree.dispatch()
        async with asyncio.timeout(10):
            while not {"a", "b"} <= set(started):  # noqa: ASYNC110 - as above
                await asyncio.sleep(0.01)
        assert await client.cancel(tree_id) is True
        with pytest.raises(CancelledCallError):
            await client.result(tree_id, timeout=5)
        children = await _children(tmp_path, tree_id)
        assert len(children) == 2
        for child in children:
            with pytest.raises(CancelledCallError, match=f"with the call {tree_id} above it"):
                await client.result(child, timeout=5)
        assert await client.cancel(tree_id) is False
        with pytest.raises(ClientError, match="no call with dispatch id") as info:
            await client.cancel("unknown")
        assert info.value.code == "not_found"


async def _children(data_dir: Path, parent_id: str) -> list[str]:
    """The children of a call, as ``dispatch-aio calls --root`` finds them."""
    found = read_connection(str(data_dir))
    assert found is not None
    async with InspectClient(*found) as inspect:
        request = inspect_pb2.ListCallsRequest(root_dispatch_id=parent_id)
        calls = await inspect.iter_calls(request)
    return [c.dispatch_id for c in calls if c.parent_dispatch_id == parent_id]
