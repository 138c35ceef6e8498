"""A dispatch-py application: functions served by dispatch-py's own endpoint.

Run by the dispatch-py virtualenv's python. Configured as dispatch-py documents it, by
DISPATCH_API_KEY, DISPATCH_API_URL, DISPATCH_ENDPOINT_URL, DISPATCH_ENDPOINT_ADDR and
DISPATCH_VERIFICATION_KEY; AIO_ENDPOINT_URL, when set, is the endpoint of the dispatch_aio
application whose functions `triple`, `explode` and `inner` it calls. Prints "ready" once
it serves.
"""

import asyncio
import logging
import os
import sys

import dispatch
from dispatch.function import Registry, default_registry

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


@dispatch.function
async def double(x):
    return 2 * x


@dispatch.function
def add(a, b):
    # A plain function, which dispatch-py runs in a thread. It takes no keyword arguments:
    # dispatch-py passes them to loop.run_in_executor(), which accepts none.
    return a + b


@dispatch.function
async def scale(x, *, factor=1):
    return x * factor


@dispatch.function
async def sequential(n):
    total = 0
    for i in range(n):
        # Not `await add(total, await double(i))`: dispatch-py cannot save a coroutine
        # suspended in the middle of another call's arguments ("cannot pickle 'coroutine'
        # object").
        doubled = await double(i)
        total = await add(total, doubled)
    return await scale(total, factor=10)


@dispatch.function
async def fan_out(xs):
    return await dispatch.gather(*(double(x) for x in xs))


@dispatch.function
async def fail(message):
    raise ValueError(message)


@dispatch.function
async def recover(message):
    try:
        await fail(message)
    except ValueError as exc:
        return f"recovered from {exc}"
    return "not raised"


@dispatch.function
async def restart(x):
    # dispatch-py's tail call: exit{tail_call} with no result and TEMPORARY_ERROR.
    raise dispatch.Reset(double, x)


@dispatch.function
async def bad_call():
    # A function name the protocol forbids: the scheduler answers with PollResult.error.
    call = dispatch.Call(function="has-dash", input=1, endpoint=default_registry().endpoint)
    try:
        await dispatch.call(call)
    except Exception as exc:
        return f"poll error {type(exc).__name__}: {exc}"
    return "not raised"


# Stubs of the dispatch_aio functions: their bodies never run here; calling them inside a
# function makes a call to AIO_ENDPOINT_URL with pickled dispatch.proto.Arguments.
AIO_ENDPOINT_URL = os.environ.get("AIO_ENDPOINT_URL")
if AIO_ENDPOINT_URL:
    aio = Registry("aio", client=default_registry().client, endpoint=AIO_ENDPOINT_URL)

    @aio.function
    async def triple(x): ...

    @aio.function
    async def explode(message): ...

    @aio.function
    async def inner(n, *, label): ...

    @dispatch.function
    async def via_aio(x):
        return await triple(x) + 1

    # Not named via_aio_primitive: dispatch-py registers via_aio's wrapper under that name.
    @dispatch.function
    async def bare_via_aio(x):
        # A low-level call: the input is the bare value, not Arguments.
        call = dispatch.Call(function="triple", input=x, endpoint=AIO_ENDPOINT_URL)
        return await dispatch.call(call)

    @dispatch.function
    async def gather_aio(xs):
        return await dispatch.gather(*(triple(x) for x in xs))

    @dispatch.function
    async def catch_aio(message):
        try:
            await explode(message)
        except ValueError as exc:
            return f"dispatch-py caught {type(exc).__name__}: {exc}"
        return "not raised"

    @dispatch.function
    async def middle(n):
        return [n, await inner(n + 1, label="from dispatch-py")]


async def main():
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    dispatch.run(main())
