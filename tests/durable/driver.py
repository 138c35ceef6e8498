"""A small in-test scheduler that drives the durable Runner directly (no HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import random
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import any_pb2

from dispatch_aio import _codec
from dispatch_aio._function import Function
from dispatch_aio._status import Status
from dispatch_aio.durable import Clock, Runner
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, poll_pb2

MODES = ("live", "replay", "shuffle")


class RealClock(Clock):
    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - self.time()))


class VirtualClock(RealClock):
    """Real time plus an offset that jumps to the earliest deadline once the host loop is idle.

    Every wait on time (the runner's and the driver's own) goes through
    ``sleep_until``, so deadlines are reached in order, as they would be in
    real time.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._jumper: asyncio.Task[None] | None = None

    def time(self) -> float:
        return time.time() + self.offset

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (deadline, self._seq, fut))
        if self._jumper is None or self._jumper.done():
            self._jumper = loop.create_task(self._jump())
        await fut

    async def _jump(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = 0
        while True:
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                return
            # Jump only once the host loop has had nothing to do for a few iterations.
            await asyncio.sleep(0)
            quiet = quiet + 1 if not loop._ready else 0  # type: ignore[attr-defined]
            if quiet < 3:
                continue
            quiet = 0
            deadline, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                self.offset += max(0.0, deadline - self.time())
                fut.set_result(None)

    async def wait(self, wake: asyncio.Event, deadline: float | None, *, idle: bool) -> None:
        if not idle or deadline is None:
            await super().wait(wake, deadline, idle=idle)
            return
        sleeper = asyncio.ensure_future(self.sleep_until(deadline))
        waker = asyncio.ensure_future(wake.wait())
        await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
        sleeper.cancel()
        waker.cancel()


@dataclasses.dataclass
class Outcome:
    status: Status
    output: Any = None
    error: BaseException | None = None


class Failed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"{outcome.status.name}: {outcome.error!r}")
        self.outcome = outcome


class Driver:
    """Plays the scheduler: runs calls, their children, Poll rounds and tail calls."""

    def __init__(
        self,
        functions: list[Function[Any, Any]],
        mode: str = "live",
        *,
        seed: int = 0,
        virtual_time: bool = True,
        live_timer_threshold: float = 1.0,
    ) -> None:
        self.functions = {f.name: f for f in functions}
        self.mode = mode
        self.rng = random.Random(seed)
        self.clock: RealClock = VirtualClock() if virtual_time else RealClock()
        self.runner = Runner(
            self._lookup,
            cache_size=0 if mode == "replay" else 64,
            clock=self.clock,
            live_timer_threshold=live_timer_threshold,
        )
        self.requests: list[function_pb2.RunRequest] = []
        self.responses: list[function_pb2.RunResponse] = []
        self.poll_errors: dict[str, int] = {}  # function -> polls to reject
        self.next_id = 0
        # Per poller: running children by correlation id, and results not yet delivered.
        self.pending: dict[
            str, tuple[dict[int, asyncio.Future[Any]], list[call_pb2.CallResult]]
        ] = {}

    def _lookup(self, name: str) -> Callable[..., Any] | None:
        f = self.functions.get(name)
        return None if f is None else f.fn

    async def close(self) -> None:
        await self.runner.aclose()

    async def call(self, fn: Function[Any, Any], *args: Any, **kwargs: Any) -> Any:
        outcome = await self.run(fn.name, _codec.encode_input(args, kwargs))
        if outcome.status is not Status.OK or outcome.error is not None:
            raise Failed(outcome)
        return outcome.output

    async def run(self, function: str, input: any_pb2.Any) -> Outcome:
        result = await self.execute(function, input)
        status, res = result
        output = _codec.decode_value(res.output) if res.HasField("output") else None
        error = _codec.decode_error(res.error) if res.HasField("error") else None
        return Outcome(status, output, error)

    async def execute(
        self, function: str, input: any_pb2.Any
    ) -> tuple[Status, call_pb2.CallResult]:
        self.next_id += 1
        req = function_pb2.RunRequest(function=function, input=input, dispatch_id=str(self.next_id))
        while True:
            resp = await self._send(req)
            directive = resp.WhichOneof("directive")
            if directive == "exit":
                if resp.exit.HasField("tail_call"):
                    tail = resp.exit.tail_call
                    req = function_pb2.RunRequest(
                        function=tail.function, input=tail.input, dispatch_id=req.dispatch_id
                    )
                    continue
                status = Status(resp.status)
                if status is Status.INCOMPATIBLE_STATE or (
                    status.temporary and status is not Status.OK
                ):
                    raise AssertionError(f"unexpected retryable status {status.name}: {resp}")
                return status, resp.exit.result
            assert directive == "poll", resp
            req = await self._poll(req, resp.poll)

    async def _send(self, req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        # Round trip through bytes, as over the wire.
        req = function_pb2.RunRequest.FromString(req.SerializeToString())
        self.requests.append(req)
        resp = await self.runner.run(req)
        resp = function_pb2.RunResponse.FromString(resp.SerializeToString())
        self.responses.append(resp)
        return resp

    async def _poll(
        self, req: function_pb2.RunRequest, poll: poll_pb2.Poll
    ) -> function_pb2.RunRequest:
        state = poll.typed_coroutine_state
        assert 1 <= poll.min_results <= poll.max_results <= 1000, poll
        pending = self.pending.setdefault(req.dispatch_id, ({}, []))
        tasks, queue = pending
        reject = self.poll_errors.get(req.function, 0) > 0 and len(poll.calls) > 0
        if reject:
            self.poll_errors[req.function] -= 1
        else:
            for call in poll.calls:
                tasks[call.correlation_id] = asyncio.ensure_future(
                    self.execute(call.function, call.input)
                )
        deadline = None
        if poll.HasField("max_wait"):
            deadline = self.clock.time() + poll.max_wait.ToTimedelta().total_seconds()
        while not reject:
            self._collect(tasks, queue)
            if len(queue) >= poll.min_results:
                break
            if deadline is not None and self.clock.time() >= deadline:
                break
            waiters: list[asyncio.Future[Any]] = list(tasks.values())
            if deadline is not None:
                waiters.append(asyncio.ensure_future(self.clock.sleep_until(deadline)))
            if not waiters:
                raise AssertionError("the function waits for results that will never come")
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if deadline is not None:
                waiters[-1].cancel()
        count = min(len(queue), poll.max_results)
        if self.mode == "shuffle" and queue:
            self.rng.shuffle(queue)
            count = self.rng.randint(min(count, poll.min_results), count) if count else 0
        delivered, queue[:] = queue[:count], queue[count:]
        result = poll_pb2.PollResult(typed_coroutine_state=state, results=delivered)
        if reject:
            result.error.type = "InvalidArgument"
            result.error.message = "calls rejected by the test scheduler"
        return function_pb2.RunRequest(
            function=req.function, poll_result=result, dispatch_id=req.dispatch_id
        )

    def _collect(
        self, tasks: dict[int, asyncio.Future[Any]], queue: list[call_pb2.CallResult]
    ) -> None:
        for cid, task in list(tasks.items()):
            if task.done():
                del tasks[cid]
                status, res = task.result()
                out = call_pb2.CallResult(correlation_id=cid)
                out.MergeFrom(res)
                out.correlation_id = cid
                if status is not Status.OK and not res.HasField("error"):
                    out.error.type = "status"
                    out.error.message = status.name
                queue.append(out)
