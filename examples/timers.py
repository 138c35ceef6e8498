# examples/timers.py
#
# Durable timers and timeouts: `asyncio.sleep`, `asyncio.timeout` and `asyncio.wait_for`
# work inside durable functions, and survive restarts.
#
#     dispatch-aio run -- python examples/timers.py
#
# A sleep longer than about a second suspends the function: the endpoint tells the
# scheduler when to wake it up and forgets about it until then, so a function can sleep
# for days. Prints how long the reminder slept and what the timeout did.
import asyncio

from dispatch_aio import Dispatch

dispatch = Dispatch()


@dispatch.function
async def remind(message: str, delay: float) -> str:
    start = asyncio.get_running_loop().time()  # durable time: the same on replay
    await asyncio.sleep(delay)
    slept = asyncio.get_running_loop().time() - start
    return f"reminder after {round(slept)} s: {message}"


@dispatch.function
async def slow_quote(item: str) -> float:
    await asyncio.sleep(2)  # a slow supplier
    return 9.99


@dispatch.function
async def quote(item: str) -> str:
    try:
        async with asyncio.timeout(1):
            price = await slow_quote(item)
    except TimeoutError:
        # The timeout stops the wait, not the call: slow_quote still runs to its end.
        return f"{item}: no quote within 1 s, using the list price"
    return f"{item}: {price}"


async def main() -> None:
    async with await dispatch.start():
        reminder_id = await remind.dispatch("stand up and stretch", 3)
        quote_id = await quote.dispatch("coffee")
        print(await dispatch.client.result(quote_id))
        print(await dispatch.client.result(reminder_id))


if __name__ == "__main__":
    asyncio.run(main())
