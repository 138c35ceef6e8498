# examples/pipeline.py
#
# A pipeline of durable steps that ends by publishing its report to an HTTP service.
#
#     dispatch-aio run -- python examples/pipeline.py
#
# Each step is a function of its own, so its result is recorded once and never computed
# again. `publish` POSTs the report with `dispatch_aio.http`: the service (a small aiohttp
# server started here, standing in for a real one) answers 503 the first time, which
# fails `publish` with a temporary error, so the scheduler runs it again; the second
# attempt succeeds. The steps before it are not run again.
import asyncio
import collections
from typing import Any

from aiohttp import web

from dispatch_aio import Dispatch, http

dispatch = Dispatch()

TEXT = "The scheduler calls the step. The step returns. The scheduler records the result."


@dispatch.function
async def tokenize(text: str) -> list[str]:
    return [word.strip(".,").lower() for word in text.split()]


@dispatch.function
async def count(words: list[str]) -> dict[str, int]:
    return dict(collections.Counter(words).most_common(3))


@dispatch.function
async def publish(url: str, report: dict[str, Any]) -> str:
    # A 503 raises http.TemporaryStatusError: the call fails as TEMPORARY_ERROR and is
    # retried with backoff. A 4xx would fail it for good.
    response = await http.post(url, json=report)
    return str(response.json()["id"])


@dispatch.function
async def pipeline(text: str, inbox_url: str) -> str:
    words = await tokenize(text)
    top = await count(words)
    return await publish(inbox_url, {"words": len(words), "top": top})


async def start_inbox() -> tuple[web.AppRunner, str]:
    """Serve the stand-in HTTP service; it fails with a 503 once, then accepts reports."""
    received = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal received
        received += 1
        if received == 1:
            print("inbox: 503, try again later")
            return web.Response(status=503, text="busy, try again later")
        print(f"inbox: received {await request.json()}")
        return web.json_response({"id": f"report-{received}"})

    app = web.Application()
    app.router.add_post("/reports", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/reports"


async def main() -> None:
    inbox, inbox_url = await start_inbox()
    try:
        async with await dispatch.start():
            dispatch_id = await pipeline.dispatch(TEXT, inbox_url)
            print(f"published as {await dispatch.client.result(dispatch_id)}")
    finally:
        await inbox.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
