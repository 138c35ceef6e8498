# examples/getting_started.py
#
# A durable function, submitted to the scheduler once the app serves it.
#
#     python examples/getting_started.py
#
# Alone, the program runs its own scheduler, in process, with its calls kept in
# .dispatch/scheduler.db: it dispatches one call to `greet`, waits for its result, prints
# "Hello, World!" and exits. Killed mid-call, it finishes the call when run again.
#
#     dispatch-aio run -- python examples/getting_started.py
#
# Under `dispatch-aio run`, the same program serves `greet` over HTTP to the separate
# local scheduler, which the DISPATCH_* variables the command sets point it at.
import asyncio

from dispatch_aio import Dispatch

dispatch = Dispatch()


@dispatch.function
async def greet(name: str) -> str:
    return f"Hello, {name}!"


async def main() -> None:
    async with await dispatch.start():  # runs the scheduler, or serves the endpoint
        dispatch_id = await greet.dispatch("World")
        print(await dispatch.client.result(dispatch_id))


if __name__ == "__main__":
    asyncio.run(main())
