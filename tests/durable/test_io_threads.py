"""Threads the function starts hand values back with call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import threading
import time

from dispatch_aio._function import Function

from .conftest import EnvFactory


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


async def _from_a_thread(delay: float) -> int:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    def work() -> None:
        time.sleep(delay)  # longer than any grace period the loop might give
        loop.call_soon_threadsafe(future.set_result, 21)

    threading.Thread(target=work).start()
    return await double(await future)


from_a_thread = Function(_from_a_thread, name="from_a_thread")


async def test_a_thread_hands_a_value_back(make_env: EnvFactory) -> None:
    env = make_env(from_a_thread, double, virtual_time=False)
    assert await env.call(from_a_thread, 0.8) == 42


async def _thread_that_never_answers() -> int:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    threading.Thread(target=time.sleep, args=(0.3,)).start()
    return await future


thread_that_never_answers = Function(_thread_that_never_answers, name="never_answers")


async def test_a_thread_that_ends_without_answering_is_a_deadlock(make_env: EnvFactory) -> None:
    env = make_env(thread_that_never_answers, virtual_time=False)
    started = time.monotonic()
    info = await env.run(thread_that_never_answers)
    assert info.status is not None and info.status.name == "PERMANENT_ERROR"
    assert "nothing will complete" in str(info.error)
    assert time.monotonic() - started >= 0.3  # not before the thread ended


async def test_a_thread_started_as_another_ends_is_waited_for(make_env: EnvFactory) -> None:
    # The outside thread is reached through the closure: threads cannot be arguments.
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()

    async def _swap() -> int:
        release.set()
        other.join()  # a thread that is not the function's ends in this step...
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()

        def work() -> None:  # ...as the function starts its own
            time.sleep(0.8)  # longer than the loop lingers
            loop.call_soon_threadsafe(future.set_result, 7)

        threading.Thread(target=work).start()
        return await future

    swap = Function(_swap, name="swap")
    env = make_env(swap, virtual_time=False)
    assert await env.call(swap) == 7
