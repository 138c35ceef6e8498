"""Per-round cost of the durable engine, with no HTTP.

Runs a chain of N sequential durable calls and a gather of N calls through the
Runner, delivering each result as soon as it is asked for, with the live
cache on and with forced replay (cache off). Prints the engine's time (inside
Runner.run) in microseconds per step (one delivered result) and, as the
baseline of each row, the ratio to the same workload at N=10 measured in the
same run. Forced replay of a chain replays every earlier round at each round,
so its cost per step grows linearly with N by nature.

    python bench/bench_engine.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dispatch_aio import _codec
from dispatch_aio._function import Function
from dispatch_aio.durable import Runner
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, poll_pb2


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _chain(n: int) -> int:
    total = 0
    for i in range(n):
        total += await double(i)
    return total


async def _fan(n: int) -> int:
    return sum(await asyncio.gather(*(double(i) for i in range(n))))


chain = Function(_chain, name="chain")
fan = Function(_fan, name="fan")
TABLE: dict[str, Callable[..., Awaitable[Any]]] = {f.name: f.fn for f in (double, chain, fan)}


async def drive(runner: Runner, fn: Function[Any, Any], n: int) -> tuple[int, float]:
    """Run fn(n) to completion; return the result and the seconds spent in the engine."""
    req = function_pb2.RunRequest(function=fn.name, input=_codec.encode_input((n,), {}))
    engine = 0.0
    while True:
        start = time.perf_counter()
        resp = await runner.run(req)
        engine += time.perf_counter() - start
        if resp.WhichOneof("directive") == "exit":
            return int(_codec.decode_value(resp.exit.result.output)), engine  # type: ignore[call-overload]
        poll = resp.poll
        result = poll_pb2.PollResult(typed_coroutine_state=poll.typed_coroutine_state)
        for call in poll.calls:
            (x,), _ = _codec.decode_input(call.input)
            result.results.append(
                call_pb2.CallResult(
                    correlation_id=call.correlation_id, output=_codec.encode_value(2 * x)
                )
            )
        req = function_pb2.RunRequest(function=fn.name, poll_result=result)


async def measure(fn: Function[Any, Any], n: int, cache: bool, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        runner = Runner(TABLE.get, cache_size=1024 if cache else 0)
        result, engine = await drive(runner, fn, n)
        samples.append(engine / n * 1e6)
        assert result == n * (n - 1)
        await runner.aclose()
    return statistics.median(samples)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'workload':<8} {'mode':<7} " + " ".join(f"{'N=' + str(n):>18}" for n in sizes))
    for fn in (chain, fan):
        for cache in (True, False):
            per_step = [await measure(fn, n, cache, args.repeat) for n in sizes]
            base = per_step[0]
            cells = " ".join(f"{us:9.1f} us ({us / base:4.2f}x)" for us in per_step)
            print(f"{fn.name:<8} {'cache' if cache else 'replay':<7} {cells}")


if __name__ == "__main__":
    asyncio.run(main())
