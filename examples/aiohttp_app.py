# examples/aiohttp_app.py
#
# An existing aiohttp application that serves the Dispatch endpoint beside its own
# routes, and dispatches a call from one of its handlers.
#
#     dispatch-aio run -- python examples/aiohttp_app.py
#
# The app serves on DISPATCH_ENDPOINT_ADDR, where the scheduler calls its functions. To
# end by itself, it then sends itself a request to `/` (as a browser would), waits for
# the call that request dispatched and prints its result. A real deployment would serve
# it with `web.run_app(make_app(), host=host, port=port)` instead.
import asyncio

import aiohttp
from aiohttp import web

from dispatch_aio import Dispatch

dispatch = Dispatch()
routes = web.RouteTableDef()


@dispatch.function
async def send_welcome(email: str) -> str:
    return f"welcome email sent to {email}"


@routes.get("/")
async def signup(request: web.Request) -> web.Response:
    email = request.query.get("email", "ada@example.com")
    dispatch_id = await send_welcome.dispatch(email)  # returns once the call is recorded
    return web.json_response({"dispatch_id": dispatch_id}, status=202)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes(routes)
    app.add_routes(dispatch.routes())  # POST /dispatch.sdk.v1.FunctionService/Run
    app.cleanup_ctx.append(dispatch.cleanup_ctx)  # checks the configuration, then cleans up
    return app


async def main() -> None:
    host, port = dispatch.endpoint_addr()  # DISPATCH_ENDPOINT_ADDR
    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        url = f"http://{host}:{port}/"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, params={"email": "grace@example.com"}) as response:
                dispatch_id = (await response.json())["dispatch_id"]
            print(f"GET / -> {response.status}")
        print(await dispatch.client.result(dispatch_id))
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
