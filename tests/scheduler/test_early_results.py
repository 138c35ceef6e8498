"""A result that makes its caller ready resumes it at once; one commit records both.

The writes that finish a child are carried into the write of its parent's resume, so
a chain of calls commits once per step. Nothing the parent's answer asks for happens
before that commit; if it fails, the answer is dropped and the child runs again, as
after a crash. A slow resume does not keep the child's result uncommitted: after a
short wait it is committed on its own, and the parent's answer waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.scheduler import Scheduler, SQLiteStore, StoreError
from dispatch_aio.scheduler.store import InsertCall, Op, Phase, UpdateCall

from .scripted import ScriptedEndpoint, call, ok, poll, resumed, unpack_text

MakeScheduler = Callable[..., Awaitable[Scheduler]]


class HeldStore(SQLiteStore):
    """A real SQLite store holding each write that finishes a `child` call.

    A held write waits until `release()`; `fail=True` makes it fail instead of
    committing (the disk was full, the database locked).
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.writes: list[str] = []  # the calls each write changes, as "function:PHASE"
        self.held = asyncio.Event()  # set while a write is held
        self._release: asyncio.Future[bool] | None = None
        self.holding = True

    def release(self, *, fail: bool = False) -> None:
        assert self._release is not None
        self._release.set_result(fail)

    async def write(self, ops: Sequence[Op]) -> None:
        self.writes.append(
            " ".join(
                f"{op.record.function}:{op.record.phase.name}"
                for op in ops
                if isinstance(op, InsertCall | UpdateCall)
            )
        )
        finishes_child = any(
            isinstance(op, UpdateCall)
            and op.record.function == "child"
            and op.record.phase is Phase.DONE
            for op in ops
        )
        if finishes_child and self.holding:
            self.holding = False  # the first one only
            self._release = asyncio.get_running_loop().create_future()
            self.held.set()
            if await self._release:
                raise StoreError("the database write failed: database is locked")
        await super().write(ops)


def counting_child(endpoint: ScriptedEndpoint) -> None:
    """`child` answers how many times it has run."""
    endpoint.on("child", lambda req: ok(f"run {len(endpoint.requests_for('child'))}"))


def echoing_parent(endpoint: ScriptedEndpoint) -> None:
    """`parent` calls `child` once and returns what it received."""

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "x", correlation_id=1)])
        return ok(unpack_text(req.poll_result.results[0].output))

    endpoint.on("parent", parent)


async def test_a_childs_result_and_its_parents_next_step_commit_together(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = HeldStore(str(tmp_path / "scheduler.db"))
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    counting_child(endpoint)
    echoing_parent(endpoint)
    [parent_id] = await s.dispatch([call("parent")])
    async with asyncio.timeout(5):
        await store.held.wait()
    # The resume went out before the child's result was written, and its answer (the
    # parent's result) is held with it: one write.
    assert len(endpoint.requests_for("parent")) == 2
    assert store.writes[-1] == "parent:DONE child:DONE"
    store.release()
    async with asyncio.timeout(5):
        result = await s.wait(parent_id)
    assert unpack_text(result.output) == "run 1"
    assert len(endpoint.requests_for("child")) == 1
    assert store.writes == [
        "parent:PENDING",
        "child:PENDING parent:SUSPENDED",
        "parent:DONE child:DONE",
    ]


async def test_an_answer_given_a_result_that_was_not_recorded_is_dropped(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = HeldStore(str(tmp_path / "scheduler.db"))
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    counting_child(endpoint)
    echoing_parent(endpoint)
    [parent_id] = await s.dispatch([call("parent")])
    async with asyncio.timeout(5):
        await store.held.wait()
    await endpoint.wait_for(lambda: len(endpoint.requests_for("parent")) == 2)
    store.release(fail=True)
    async with asyncio.timeout(10):
        result = await s.wait(parent_id)
    # The first answer acted on "run 1", which was never recorded: the child ran again
    # and the parent's result is the one built on the recorded "run 2".
    assert unpack_text(result.output) == "run 2"
    children = endpoint.requests_for("child")
    assert len(children) == 2
    assert children[0].request.dispatch_id == children[1].request.dispatch_id
    resumes = endpoint.requests_for("parent")[1:]
    assert [unpack_text(r.results[0].output) for r in resumes] == ["run 1", "run 2"]
    # The same state both times: the dropped answer changed nothing that was kept.
    assert resumes[0].request.poll_result.coroutine_state == b"state"
    assert resumes[1].request.poll_result.coroutine_state == b"state"


def slow_parent(endpoint: ScriptedEndpoint, resumed_once: asyncio.Event) -> asyncio.Event:
    """`parent` calls `child`; its first resume answers once the returned event is set."""
    answer = asyncio.Event()

    async def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("child", "x", correlation_id=1)])
        if not resumed_once.is_set():
            resumed_once.set()
            await answer.wait()
        return ok(unpack_text(req.poll_result.results[0].output))

    endpoint.on("parent", parent)
    return answer


async def test_a_slow_resume_leaves_the_childs_result_committed_on_its_own(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = HeldStore(str(tmp_path / "scheduler.db"))
    store.holding = False
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    counting_child(endpoint)
    resumed_once = asyncio.Event()
    answer = slow_parent(endpoint, resumed_once)
    [parent_id] = await s.dispatch([call("parent")])
    async with asyncio.timeout(5):
        await resumed_once.wait()
    child_id = endpoint.requests_for("child")[0].request.dispatch_id
    async with asyncio.timeout(5):  # within the carry wait, not the resume's answer
        child = await s.wait(child_id)
    assert unpack_text(child.output) == "run 1"
    assert (await store.get_call(child_id)).phase is Phase.DONE  # type: ignore[union-attr]
    answer.set()
    async with asyncio.timeout(5):
        result = await s.wait(parent_id)
    assert unpack_text(result.output) == "run 1"
    assert store.writes[-2:] == ["child:DONE", "parent:DONE"]


async def test_a_slow_resume_given_a_result_whose_own_commit_failed_is_dropped(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    store = HeldStore(str(tmp_path / "scheduler.db"))
    s = await make_scheduler(store, default_endpoint=endpoint.url)
    counting_child(endpoint)
    resumed_once = asyncio.Event()
    answer = slow_parent(endpoint, resumed_once)
    [parent_id] = await s.dispatch([call("parent")])
    async with asyncio.timeout(5):
        await resumed_once.wait()
        await store.held.wait()  # the child's result, committed on its own
    assert store.writes[-1] == "child:DONE"
    store.release(fail=True)
    await asyncio.sleep(0.05)
    answer.set()  # an answer built on "run 1", which was not recorded
    async with asyncio.timeout(10):
        result = await s.wait(parent_id)
    assert unpack_text(result.output) == "run 2"
    assert len(endpoint.requests_for("child")) == 2
    resumes = endpoint.requests_for("parent")[1:]
    assert [unpack_text(r.results[0].output) for r in resumes] == ["run 1", "run 2"]
