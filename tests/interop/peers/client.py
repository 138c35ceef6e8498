"""dispatch-py's client submitting calls to a Dispatch API: here, our scheduler.

Run by the dispatch-py virtualenv's python, configured by DISPATCH_API_URL,
DISPATCH_API_KEY and DISPATCH_ENDPOINT_URL (the endpoint serving the functions, whose
stubs are declared below). Prints `ids <json>`: the dispatch id of each call by label; or
`error <type>: <message>` if the API refused them.
"""

import asyncio
import json
import logging
import os
import sys

import dispatch
from dispatch.function import current_session, default_registry

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


# Stubs of functions served at DISPATCH_ENDPOINT_URL; their bodies never run here.
@dispatch.function
async def greet(name): ...


@dispatch.function
async def add(a, b=0): ...


@dispatch.function
async def total(xs): ...


async def submit():
    ids = {}
    ids["greet"] = await greet.dispatch("World")
    ids["add"] = await add.dispatch(1, b=2)
    batch = dispatch.batch()
    batch.add(greet, "batch").add(total, [1, 2, 3])
    ids["batch_greet"], ids["batch_total"] = await batch.dispatch()
    # A low-level call: the input is the bare value, not Arguments.
    primitive = dispatch.Call(
        function="greet", input="primitive", endpoint=os.environ["DISPATCH_ENDPOINT_URL"]
    )
    (ids["primitive"],) = await default_registry().client.dispatch([primitive])
    return ids


async def main():
    try:
        ids = await submit()
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
    else:
        print("ids", json.dumps(ids), flush=True)
    finally:
        await current_session().close()


if __name__ == "__main__":
    asyncio.run(main())
