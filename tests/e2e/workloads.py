"""The application of the end-to-end tests: durable functions served with dispatch.run().

Run as a script with the DISPATCH_* variables a ``dispatch-aio server`` printed. Function
results say what the functions received, so a lost, duplicated or misrouted result shows
up in the result of the caller.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import sys

import dispatch_aio
from dispatch_aio import Dispatch, errors

dispatch = Dispatch()

# Attempts of `flaky`, per token (in this process).
ATTEMPTS: collections.Counter[str] = collections.Counter()


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


@dispatch.function
async def fan_out(n: int) -> list[int]:
    """Call `double` n times concurrently; return what came back, in order."""
    return list(await asyncio.gather(*(double(i) for i in range(n))))


@dispatch.function
def collector() -> tuple[int, int]:
    """How many objects dispatch.run() set aside from the garbage collector once started,
    and after how many new objects the collector runs."""
    return gc.get_freeze_count(), gc.get_threshold()[0]


@dispatch.function
async def add_one(x: int) -> int:
    return x + 1


@dispatch.function
async def chain(n: int) -> int:
    """n sequential calls, each on the result of the previous one."""
    x = 0
    for _ in range(n):
        x = await add_one(x)
    return x


@dispatch.function(name="tick")
async def tick(label: str) -> None:
    """Say that a scheduled call ran."""
    print("tick", label, flush=True)


@dispatch.function
async def wait_for(key: str) -> str:
    """Wait for the durable event `key`; return its value's repr."""
    return repr(await dispatch_aio.wait_event(key))


@dispatch.function
async def nap(seconds: float) -> str:
    """Sleep durably (the run suspends: its timer lives in the scheduler)."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@dispatch.function
async def reject(x: int) -> int:
    raise errors.PermanentError(f"permanently refusing {x}")


@dispatch.function
async def call_reject(x: int) -> str:
    """Call `reject` and report the error it raised here."""
    try:
        await reject(x)
    except errors.PermanentError as exc:
        return f"caught {type(exc).__name__}: {exc}"
    return "no error"


@dispatch.function
async def flaky(token: str, failures: int) -> int:
    """Fail with a temporary error `failures` times, then return the attempt number."""
    ATTEMPTS[token] += 1
    if ATTEMPTS[token] <= failures:
        raise errors.TemporaryError(f"attempt {ATTEMPTS[token]} of {token} fails")
    return ATTEMPTS[token]


@dispatch.function
async def call_flaky(token: str, failures: int) -> str:
    return f"flaky answered {await flaky(token, failures)}"


@dispatch.function
async def countdown(n: int) -> str:
    """Tail-call itself down to zero: one dispatch id, no child calls."""
    if n == 0:
        return "liftoff"
    countdown.tail_call(n - 1)


@dispatch.function
async def hand_over(x: int) -> int:
    """Tail-call another function: its result is this call's result."""
    double.tail_call(x + 1)


@dispatch.function
async def leaf(tag: str) -> str:
    await asyncio.sleep(0.2)  # shorter than the live timer threshold: no suspension
    return f"<{tag}>"


@dispatch.function
async def rounds(i: int) -> list[str]:
    """Three rounds of a call then a gather of three: what came back, in order."""
    seen = []
    for r in range(3):
        seen.append(await leaf(f"{i}.{r}"))
        seen.extend(await asyncio.gather(*(leaf(f"{i}.{r}.{k}") for k in range(3))))
    return seen


def expected_rounds(i: int) -> list[str]:
    seen = []
    for r in range(3):
        seen.append(f"<{i}.{r}>")
        seen.extend(f"<{i}.{r}.{k}>" for k in range(3))
    return seen


if __name__ == "__main__":
    print("serving", flush=True)
    dispatch.run()
    sys.exit(0)
