# examples/fan_out.py
#
# Fan-out and fan-in: one function makes many durable calls at once and combines their
# results, with `asyncio.gather` (results in call order) and `asyncio.as_completed`
# (results as they arrive).
#
#     dispatch-aio run -- python examples/fan_out.py
#
# Prints the sum of the squares of 1..100 and the number of words in a few documents.
import asyncio

from dispatch_aio import Dispatch

dispatch = Dispatch()

DOCUMENTS = [
    "durable functions survive crashes",
    "every call is made by the scheduler",
    "results are recorded in the journal",
]


@dispatch.function
async def square(n: int) -> int:
    return n * n


@dispatch.function
async def sum_of_squares(n: int) -> int:
    # n calls go out together; gather returns their results in call order.
    squares = await asyncio.gather(*(square(i) for i in range(1, n + 1)))
    return sum(squares)


@dispatch.function
async def count_words(text: str) -> int:
    return len(text.split())


@dispatch.function
async def total_words(documents: list[str]) -> int:
    total = 0
    # Handle each result as soon as it arrives, whatever the order.
    for next_count in asyncio.as_completed([count_words(doc) for doc in documents]):
        total += await next_count
    return total


async def main() -> None:
    async with await dispatch.start():
        # Submit both calls in one request: both are created, or neither.
        batch = dispatch.batch()
        batch.add(sum_of_squares, 100)
        batch.add(total_words, DOCUMENTS)
        squares_id, words_id = await batch.submit()
        squares = await dispatch.client.result(squares_id)  # waits until the call is done
        words = await dispatch.client.result(words_id)
        print(f"sum of squares of 1..100: {squares}")
        print(f"words in {len(DOCUMENTS)} documents: {words}")


if __name__ == "__main__":
    asyncio.run(main())
