"""End to end: `dispatch-aio server` and an application on this SDK, as real processes.

The timings are printed (``pytest -s``) and the limits are generous: they catch a
workload that stalls, not a slow machine.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

from ports import free_port

from dispatch_aio._codec import decode_value
from dispatch_aio._status import Status
from dispatch_aio.proto.v1 import inspect_pb2

from .conftest import Stack, start_app
from .harness import Starter

DONE = inspect_pb2.CALL_STATE_DONE


def output(info: inspect_pb2.CallInfo) -> object:
    assert info.status == Status.OK, info
    assert not info.result.HasField("error"), info.result.error
    return decode_value(info.result.output)


async def children_of(stack: Stack, dispatch_id: str) -> list[inspect_pb2.CallInfo]:
    async with stack.inspect() as inspect:
        tree = await inspect.get_call(dispatch_id)
    return [child.call for child in tree.children]


async def test_gather_of_1000_children(stack: Stack) -> None:
    info, seconds = await stack.call("fan_out", 1000, max_wait=60)
    print(f"gather of 1000 children: {seconds:.2f} s")
    assert output(info) == [2 * i for i in range(1000)]
    children = await children_of(stack, info.dispatch_id)
    assert len(children) == info.child_count == 1000
    assert all(c.state == DONE and c.status == Status.OK for c in children)
    assert sorted(decode_value(c.result.output) for c in children) == [2 * i for i in range(1000)]


async def test_the_app_set_its_garbage_collector_up_for_a_server(stack: Stack) -> None:
    info, _ = await stack.call("collector")
    frozen, young = decode_value(info.result.output)  # type: ignore[misc]
    # The modules and state of a started app: tens of thousands of objects.
    assert frozen > 10_000
    assert young >= 10_000  # not the default 700


async def test_chain_of_200_sequential_calls(stack: Stack) -> None:
    info, seconds = await stack.call("chain", 200, max_wait=60)
    print(f"chain of 200 calls: {seconds:.2f} s")
    assert output(info) == 200
    assert info.child_count == 200
    assert info.polls == 200  # one suspension per call: they ran one after the other


async def test_durable_sleep(stack: Stack) -> None:
    info, seconds = await stack.call("nap", 3)
    print(f"durable sleep of 3 s: {seconds:.2f} s")
    assert output(info) == "slept 3"
    assert 3 <= seconds < 10
    assert info.polls == 1  # the run suspended; the scheduler woke it up


async def test_durable_sleep_survives_a_restart_of_the_app(stack: Stack, procs: Starter) -> None:
    port = free_port()
    app = start_app(procs, stack.server, port)
    start = time.perf_counter()
    dispatch_id = await stack.submit("nap", 3, endpoint=f"http://127.0.0.1:{port}")
    async with stack.inspect() as inspect:
        while (await inspect.wait_call(dispatch_id, 0)).state != inspect_pb2.CALL_STATE_SUSPENDED:
            assert time.perf_counter() - start < 10
            await asyncio.sleep(0.05)
    app.kill()  # its memory (the live run) is gone: the state travels with the Poll
    start_app(procs, stack.server, port)
    info = await stack.wait(dispatch_id)
    assert output(info) == "slept 3"
    assert time.perf_counter() - start >= 3
    assert info.polls == 1


async def test_a_permanent_error_surfaces_to_the_caller(stack: Stack) -> None:
    info, _ = await stack.call("reject", 5)
    assert info.status == Status.PERMANENT_ERROR
    assert info.attempts == 1  # not retried
    assert info.result.error.type == "PermanentError"
    assert info.result.error.message == "permanently refusing 5"

    info, _ = await stack.call("call_reject", 6)
    assert output(info) == "caught PermanentError: permanently refusing 6"
    (child,) = await children_of(stack, info.dispatch_id)
    assert (child.function, child.status, child.attempts) == ("reject", Status.PERMANENT_ERROR, 1)


async def test_a_temporary_error_is_retried_until_it_succeeds(stack: Stack) -> None:
    token = uuid.uuid4().hex
    info, seconds = await stack.call("call_flaky", token, 2)
    print(f"two retries: {seconds:.2f} s")
    assert output(info) == "flaky answered 3"
    (child,) = await children_of(stack, info.dispatch_id)
    assert (child.function, child.status, child.attempts) == ("flaky", Status.OK, 3)


async def test_tail_calls(stack: Stack) -> None:
    info, _ = await stack.call("countdown", 20)
    assert output(info) == "liftoff"
    assert info.child_count == 0  # one dispatch id all along
    assert info.attempts == 21
    info, _ = await stack.call("hand_over", 4)
    assert output(info) == 10
    assert info.function == "double"  # the call now runs the function it was handed to
    assert info.child_count == 0


def test_the_server_stops_cleanly(stack: Stack) -> None:
    # Last in this module: SIGTERM stops the scheduler with status 0.
    stack.server.proc.send(signal.SIGTERM)
    assert stack.server.proc.wait(10) == 0, stack.server.proc.dump()
