"""asyncio idioms under the real scheduler, with the app SIGKILLed and restarted mid-call.

Each idiom of the sweep in `durable/test_idioms.py` that completes in real time (no
hour-long durable sleeps) is submitted to a `dispatch-aio server`, served by an app that
is killed and started again while the calls run, so their runs resume by replay in new
processes. Every result must equal the one the same call gives in process, live; the
sweep checks that one against the expected values.
"""

from __future__ import annotations

import asyncio
import random
import textwrap
import time
from pathlib import Path
from typing import Any

from durable import test_idioms as idioms
from ports import free_port

from dispatch_aio._codec import decode_value
from dispatch_aio._function import Function
from dispatch_aio.proto.v1 import inspect_pb2
from dispatch_aio.testing import Environment

from .conftest import Stack
from .harness import PYTHON, Starter, start_server, wait_for_port

TESTS = Path(__file__).parents[1]
APP = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    from dispatch_aio import Dispatch
    from durable.test_idioms import FUNCTIONS

    dispatch = Dispatch()
    for fn in FUNCTIONS:
        dispatch.function(name=fn.name)(fn.fn)

    if __name__ == "__main__":
        dispatch.run()
    """
)
IDIOMS: list[tuple[Function[..., Any], tuple[Any, ...]]] = [
    (idioms.gather_return_exceptions, ()),
    (idioms.queue_pipeline, (7,)),
    (idioms.semaphore_peak, (10, 3)),
    (idioms.context_into_children, ()),
    (idioms.depth, (100,)),
    (idioms.generators_and_managers, ()),
    (idioms.errors_across_calls, ()),
    (idioms.values_across_calls, ()),
    (idioms.large_results, ([1_000_000, 10],)),
    (idioms.threads, ()),
    (idioms.subprocess_idiom, ()),
]
KILLS = 4


async def test_idioms_give_the_same_results_across_app_restarts(
    procs: Starter, tmp_path: Path
) -> None:
    async with Environment(idioms.FUNCTIONS, virtual_time=False, max_attempts=1) as env:
        expected = [await env.call(fn, *args) for fn, args in IDIOMS]

    port = free_port()
    server = start_server(
        procs, "--port", "0", "--data-dir", str(tmp_path / "data"), "--endpoint",
        f"127.0.0.1:{port}", "--max-attempts", "2",
    )  # fmt: skip
    script = tmp_path / "idioms_app.py"
    script.write_text(APP)
    env_vars = server.app_env(
        DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}", DISPATCH_ENDPOINT_URL=f"http://127.0.0.1:{port}"
    )

    def start_app() -> Any:
        app = procs([PYTHON, str(script)], env=env_vars)
        wait_for_port(port, proc=app)
        return app

    stack = Stack(server, start_app(), f"http://127.0.0.1:{port}")
    ids = [await stack.submit(fn.name, *args) for fn, args in IDIOMS]
    rng = random.Random()
    started = time.perf_counter()
    busy_kills = 0
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.01, 0.1))
        async with stack.inspect() as inspect:
            unfinished = [
                inspect_pb2.CALL_STATE_PENDING,
                inspect_pb2.CALL_STATE_RUNNING,
                inspect_pb2.CALL_STATE_SUSPENDED,
            ]
            request = inspect_pb2.ListCallsRequest(states=unfinished, omit_payloads=True, limit=1)
            busy_kills += bool((await inspect.list_calls(request)).calls)
        stack.app.kill()
        stack.app = start_app()
        # More of the same, so that the next kill finds calls in flight too.
        ids += [await stack.submit(fn.name, *args) for fn, args in IDIOMS]
    assert busy_kills == KILLS, "every kill must hit calls in flight, or the test shows nothing"
    results = []
    async with stack.inspect() as inspect:
        for dispatch_id in ids:
            info = await inspect.wait_call(dispatch_id, 60)
            assert info.state == inspect_pb2.CALL_STATE_DONE, info
            results.append(decode_value(info.result.output) if info.result.output else info)
    print(f"idioms across {KILLS} app kills: {time.perf_counter() - started:.1f} s")
    batches = len(ids) // len(IDIOMS)
    for (fn, _), got, want in zip(IDIOMS * batches, results, expected * batches, strict=True):
        assert got == want, fn.name
