"""dispatch-py 0.8.0 on the workloads of bench_e2e.py, with its in-process test scheduler.

Run by the python of the dispatch-py virtualenv (see bench_e2e.py), never imported by
dispatch_aio: the two SDKs register the same protobuf package. As ``dispatch.test.main``
does, one process serves dispatch.test's in-memory scheduler (no persistence; it calls
the endpoint unsigned) and the functions, and submits the calls with dispatch-py's client
(one keep-alive session).

    python dispatch_py_bench.py WORKLOAD SIZE [PROFILE_PATH]

Prints ``ready`` after an untimed warm-up call, runs the workload when a line arrives
on standard input, prints ``result <json>`` (``seconds``, and ``marks`` for the timed
chain), and exits when standard input closes. With PROFILE_PATH, the workload runs under
cProfile and the stats are written there.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import dispatch
import dispatch.test  # installs the default registry (its test client) the functions join
from dispatch.function import Client, default_registry
from dispatch.http import Dispatch


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


@dispatch.function
async def fan_out(n: int) -> int:
    return sum(await dispatch.gather(*(double(i) for i in range(n))))


@dispatch.function
async def add_one(x: int) -> int:
    return x + 1


@dispatch.function
async def chain(n: int) -> int:
    x = 0
    for _ in range(n):
        x = await add_one(x)
    return x


@dispatch.function
async def stamp(x: int) -> tuple[int, float]:
    return x + 1, time.monotonic()


@dispatch.function
async def timed_chain(n: int, every: int) -> list[tuple[int, float]]:
    # The same as bench_e2e.py's: the time each `every`-th step (and the last) ran.
    x = 0
    marks = []
    for i in range(n):
        x, at = await stamp(x)
        if i % every == 0 or i == n - 1:
            marks.append((i, at))
    return marks


async def call(function: Any, *args: Any) -> Any:
    client = default_registry().client
    return await client.wait(await function.dispatch(*args))


async def w1(n: int) -> Any:
    result = await call(fan_out, n)
    assert result == n * (n - 1), result
    return None


async def w2(n: int) -> Any:
    result = await call(chain, n)
    assert result == n, result
    return None


async def _wait_all(ids: list[str]) -> None:
    client = default_registry().client
    outputs = await asyncio.gather(*(client.wait(i) for i in ids))
    assert sorted(outputs) == [2 * i for i in range(len(ids))]


async def w3one(n: int) -> Any:
    await _wait_all([await double.dispatch(i) for i in range(n)])
    return None


async def w3batch(n: int) -> Any:
    batch = dispatch.batch()
    for i in range(n):
        batch.add(double, i)
    await _wait_all(await batch.dispatch())
    return None


async def w4(n: int) -> Any:
    marks = await call(timed_chain, n, max(1, n // 10))
    assert marks[-1][0] == n - 1, marks[-1]
    return marks


WORKLOADS: dict[str, Callable[[int], Awaitable[Any]]] = {
    "w1": w1,
    "w2": w2,
    "w3one": w3one,
    "w3batch": w3batch,
    "w4": w4,
}


async def main(workload: str, size: int, profile_path: str | None) -> None:
    run = WORKLOADS[workload]
    loop = asyncio.get_running_loop()
    registry = default_registry()
    service = dispatch.test.Service()
    try:
        async with (
            dispatch.test.Server(service) as backend,
            dispatch.test.Server(Dispatch(registry)) as server,
        ):
            # As dispatch.test.main does, but with dispatch-py's own client rather than
            # dispatch.test's, which opens a new connection for every submission.
            registry.client = Client(api_key=dispatch.test.DISPATCH_API_KEY, api_url=backend.url)
            registry.endpoint = server.url
            await w1(4)  # warm-up, not timed
            print("ready", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            profile = cProfile.Profile() if profile_path else None
            if profile is not None:
                profile.enable()
            start = time.perf_counter()
            marks = await run(size)
            seconds = time.perf_counter() - start
            if profile is not None:
                profile.disable()
                profile.dump_stats(profile_path)
            print("result", json.dumps({"seconds": seconds, "marks": marks}), flush=True)
            await loop.run_in_executor(None, sys.stdin.read)  # until the driver closes it
    finally:
        await service.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
