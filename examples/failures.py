# examples/failures.py
#
# Failures: what the scheduler retries, what it does not, and how the caller sees it.
#
#     dispatch-aio run -- python examples/failures.py
#
# An exception raised by a durable function ends its call with a status. Temporary ones
# (ConnectionError, TimeoutError, dispatch_aio.errors.TemporaryError, HTTP 5xx ...) make
# the scheduler run the call again, with backoff; the caller only sees the final result.
# Other exceptions fail the call for good, and the caller's `await` raises them.
import asyncio
import collections

from dispatch_aio import Dispatch

dispatch = Dispatch()

# Calls to reserve_seat per flight, so that the seat service fails twice, then recovers.
attempts: collections.Counter[str] = collections.Counter()


class PaymentDeclined(Exception):
    """Not a temporary failure: a call that raises it is not retried."""


@dispatch.function
async def reserve_seat(flight: str) -> str:
    attempts[flight] += 1
    if attempts[flight] < 3:
        raise ConnectionError("the seat service is unreachable")  # retried
    return f"seat 12A on {flight} (attempt {attempts[flight]})"


@dispatch.function
async def release_seat(flight: str) -> None:
    print(f"seat on {flight} released")


@dispatch.function
async def charge(card: str, amount: float) -> str:
    if card.endswith("0000"):
        raise PaymentDeclined(f"card {card} declined")  # not retried
    return f"charged {amount:.2f} to {card}"


@dispatch.function
async def book(flight: str, card: str) -> str:
    seat = await reserve_seat(flight)  # failed twice, but we only see the result
    try:
        receipt = await charge(card, 420.0)
    except PaymentDeclined as exc:  # the exception charge raised, delivered here
        await release_seat(flight)
        return f"not booked: {exc}"
    return f"booked {seat}, {receipt}"


async def main() -> None:
    async with await dispatch.start():
        for flight, card in [("DA 101", "4242-4242-4242-4242"), ("DA 202", "4000-0000-0000-0000")]:
            dispatch_id = await book.dispatch(flight, card)
            print(await dispatch.client.result(dispatch_id))
        # Waiting for the result of a call that failed raises its exception.
        dispatch_id = await charge.dispatch("4000-0000-0000-0000", 5.0)
        try:
            await dispatch.client.result(dispatch_id)
        except PaymentDeclined as exc:
            print(f"charge failed: {exc!r}")


if __name__ == "__main__":
    asyncio.run(main())
