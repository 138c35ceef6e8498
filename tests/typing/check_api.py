"""Static types of the public API: type-checked by test_typing.py, never run.

A line that must fail type checking ends with ``# E: <mypy error code>``; every other
line must pass. ``assert_type`` pins inferred types.
"""

from __future__ import annotations

from typing import assert_type

from dispatch_aio import Batch, Call, Dispatch, Function, http

dispatch = Dispatch()


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


@dispatch.function(name="greet")
async def greet(name: str, *, polite: bool = False) -> str:
    return f"Dear {name}" if polite else name


def expects_int_to_int(fn: Function[[int], int]) -> None: ...


async def calls() -> None:
    assert_type(await double(1), int)
    assert_type(await double.dispatch(1), str)
    assert_type(await greet("Ada", polite=True), str)
    assert_type(await greet.dispatch("Ada", polite=True), str)
    expects_int_to_int(double)
    expects_int_to_int(greet)  # E: arg-type

    await double("one")  # E: arg-type
    await double.dispatch("one")  # E: arg-type
    await double.dispatch()  # E: call-arg
    await double.dispatch(1, 2)  # E: call-arg
    await greet.dispatch("Ada", rude=True)  # E: call-arg
    greet.tail_call(42)  # E: arg-type


async def batches() -> None:
    batch = dispatch.batch()
    assert_type(batch, Batch)
    batch.add(double, 1)
    batch.add(greet, "Ada", polite=True)
    batch.add(double, "one")  # E: arg-type
    batch.add(greet, "Ada", polite="yes")  # E: arg-type
    batch.add_call(Call("other", (1,), endpoint="https://elsewhere.example.com"))
    assert_type(await batch.submit(), list[str])
    assert_type(await dispatch.client.dispatch([Call("f")]), list[str])


async def http_helpers() -> None:
    response = await http.get("https://example.com", params={"q": 1}, timeout=5)
    assert_type(response, http.Response)
    assert_type(response.status, int)
    assert_type(response.body, bytes)
    await http.get("https://example.com", timeout="soon")  # E: arg-type
    await http.get("https://example.com", retries=3)  # E: call-arg


@dispatch.function  # a plain def: a leaf run in a thread, typed like the others
def blocking(x: int) -> int:
    return x


async def sync_functions() -> None:
    assert_type(await blocking(2), int)
    assert_type(await blocking.dispatch(2), str)
    await blocking("two")  # E: arg-type
