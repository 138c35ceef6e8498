# examples/getting_started.py
#
# A durable function, submitted to the scheduler once the app serves its endpoint.
#
#     dispatch-aio run -- python examples/getting_started.py
#
# `dispatch-aio run` starts the local scheduler, then this program with the DISPATCH_*
# variables set. The program serves `greet`, dispatches one call, waits for its result
# (through the scheduler, which called `greet` on the endpoint), prints "Hello, World!"
# and exits.
import asyncio

from dispatch_aio import Dispatch

dispatch = Dispatch()


@dispatch.function
async def greet(name: str) -> str:
    return f"Hello, {name}!"


async def main() -> None:
    async with await dispatch.start():  # serves the endpoint on DISPATCH_ENDPOINT_ADDR
        dispatch_id = await greet.dispatch("World")
        print(await dispatch.client.result(dispatch_id))


if __name__ == "__main__":
    asyncio.run(main())
