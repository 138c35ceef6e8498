# examples/fastapi_app.py
#
# A FastAPI application that serves the Dispatch endpoint beside its own routes, and
# dispatches a call from one of its handlers.
#
#     python examples/fastapi_app.py
#     dispatch-aio run -- python examples/fastapi_app.py
#
# The endpoint is an ASGI route of the app (`dispatch.asgi()`), and `dispatch.lifespan`
# starts and stops Dispatch with the app: alone, it runs the embedded scheduler; under
# `dispatch-aio run`, it checks the configuration for the separate one, which calls the
# app on DISPATCH_ENDPOINT_ADDR. To end by itself, the program sends itself a request to
# `/`, waits for the call that request dispatched and prints its result; a real
# deployment would run `uvicorn examples.fastapi_app:app` instead.
import asyncio

import aiohttp
import uvicorn
from fastapi import FastAPI

from dispatch_aio import Dispatch
from dispatch_aio.asgi import PATHS

dispatch = Dispatch()
app = FastAPI(lifespan=dispatch.lifespan)
endpoint = dispatch.asgi()
for path in PATHS:  # Run requests, and batches of them from dispatch-aio's scheduler
    app.add_route(path, endpoint, methods=["POST"])


@dispatch.function
async def send_welcome(email: str) -> str:
    return f"welcome email sent to {email}"


@app.get("/", status_code=202)
async def signup(email: str = "ada@example.com") -> dict[str, str]:
    dispatch_id = await send_welcome.dispatch(email)  # returns once the call is recorded
    return {"dispatch_id": dispatch_id}


@app.get("/health")
async def health() -> str:
    return "ok"


async def main() -> None:
    host, port = dispatch.endpoint_addr()  # DISPATCH_ENDPOINT_ADDR
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():  # it could not start: say why
            serving.result()
            return
        await asyncio.sleep(0.02)
    try:
        url = f"http://{host}:{port}/"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, params={"email": "grace@example.com"}) as response:
                dispatch_id = (await response.json())["dispatch_id"]
            print(f"GET / -> {response.status}")
        print(await dispatch.client.result(dispatch_id))
    finally:
        server.should_exit = True
        await serving


if __name__ == "__main__":
    asyncio.run(main())
