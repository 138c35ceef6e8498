"""Small applications the CLI tests run, written to a file of the test's folder."""

from __future__ import annotations

from pathlib import Path

# Dispatches two calls once its endpoint is up, waits for both with the scheduler's Wait
# RPC, and exits with the status given as its first argument. APP_PAUSE makes `total`
# sleep durably before it returns. APP_MODE=submit exits once the calls are submitted;
# APP_MODE=serve only serves (until SIGINT or SIGTERM).
EXAMPLE_APP = """
import asyncio
import os
import sys

import aiohttp

from dispatch_aio import Dispatch, errors

dispatch = Dispatch()


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


@dispatch.function
async def total(n: int) -> int:
    parts = await asyncio.gather(*(double(i) for i in range(n)))
    await asyncio.sleep(float(os.environ.get("APP_PAUSE", "0")))
    return sum(parts)


@dispatch.function
async def reject(x: int) -> int:
    raise errors.PermanentError(f"cannot take {x}")


async def wait(session: aiohttp.ClientSession, dispatch_id: str) -> None:
    url = os.environ["DISPATCH_API_URL"] + "/dispatch.sdk.v1.DispatchService/Wait"
    headers = {"Authorization": "Bearer " + os.environ["DISPATCH_API_KEY"]}
    async with session.post(url, data=dispatch_id.encode(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def main() -> int:
    mode = os.environ.get("APP_MODE", "wait")
    names = ["DISPATCH_API_URL", "DISPATCH_API_KEY", "DISPATCH_ENDPOINT_URL",
             "DISPATCH_ENDPOINT_ADDR", "DISPATCH_VERIFICATION_KEY"]
    print("variables:", " ".join(name for name in names if os.environ.get(name)))
    print("api key:", os.environ.get("DISPATCH_API_KEY"))
    async with await dispatch.start():
        print("serving")
        ids = [await total.dispatch(10), await reject.dispatch(3)]
        if mode == "wait":
            async with aiohttp.ClientSession() as session:
                for dispatch_id in ids:
                    await wait(session, dispatch_id)
            print("all results in", file=sys.stderr)
    await dispatch.aclose()
    return int(sys.argv[1]) if len(sys.argv) > 1 else 0


if os.environ.get("APP_MODE") == "serve":
    print("serving")
    dispatch.run()
else:
    sys.exit(asyncio.run(main()))
"""

# Prints "ready", then sleeps; with "ignore" it ignores SIGINT and SIGTERM.
SLEEPER_APP = """
import signal
import sys
import time

if sys.argv[1:] == ["ignore"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def write_app(folder: Path, source: str, name: str = "app.py") -> Path:
    path = folder / name
    path.write_text(source, "utf-8")
    return path
