"""Nondeterminism that does not rely on luck: detection, perturbed time, un-awaited calls."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import pathlib
import pickle
import random
import secrets
import time
import uuid

import pytest

import dispatch_aio
from dispatch_aio import Dispatch
from dispatch_aio.errors import NondeterminismError
from dispatch_aio.testing import Environment, check_determinism

dispatch = Dispatch()
HERE = "test_testing_determinism.py"


@dispatch.function
async def even() -> str:
    return "even"


@dispatch.function
async def odd() -> str:
    return "odd"


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


@dispatch.function
async def on_the_clock() -> str:
    if int(time.time()) % 2 == 0:  # the branch under test
        first = await even()
    else:
        first = await odd()
    return first


def _line_of(text: str) -> int:
    lines = pathlib.Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


async def test_a_time_branch_is_caught_by_the_detector_with_the_line() -> None:
    line = _line_of("# the branch under test")
    with pytest.raises(NondeterminismError) as info:
        async with Environment(dispatch) as env:
            await env.call(on_the_clock)
    message = str(info.value)
    assert f"time.time() at {__file__}:{line}: use dispatch_aio.now()" in message


async def test_a_time_branch_is_caught_by_check_determinism() -> None:
    with pytest.raises(NondeterminismError, match=rf"time\.time\(\) at \S*{HERE}:"):
        await check_determinism(dispatch, on_the_clock)


async def test_perturbed_time_flips_a_time_branch_on_replay() -> None:
    # Without the detection, the replay still reads another time and diverges there.
    with pytest.raises(NondeterminismError, match="diverged from its journal") as info:
        async with Environment(
            dispatch, replay="always", nondeterminism="off", perturb_time=True
        ) as env:
            await env.call(on_the_clock)
    assert "'even'" in str(info.value) and "'odd'" in str(info.value)
    assert f"{HERE}:" in str(info.value), "the report names the call site"


@dispatch.function
async def reads_everything() -> list[str]:
    await double(1)
    seen = [
        str(datetime.datetime.now()),
        str(random.random()),
        str(random.randint(1, 6)),
        str(uuid.uuid4()),
        os.urandom(2).hex(),
        secrets.token_hex(2),
        str(time.monotonic()),
    ]
    # Deterministic: seeded generators and the durable helpers.
    seen.append(str(random.Random(3).random()))
    seen.append(str(dispatch_aio.now()) + str(dispatch_aio.random()) + str(dispatch_aio.uuid4()))
    logging.getLogger("quiet").debug("the standard library reads the clock: not the program")
    return seen


async def test_every_source_is_named_with_its_replacement() -> None:
    with pytest.raises(NondeterminismError) as info:
        async with Environment(dispatch) as env:
            await env.call(reads_everything)
    message = str(info.value).partition("\nRaised in")[0]
    for source, replacement in [
        ("datetime.now()", "dispatch_aio.now()"),
        ("random.random()", "dispatch_aio.random()"),
        ("random.randint()", "dispatch_aio.random()"),
        ("uuid.uuid4()", "dispatch_aio.uuid4()"),
        ("os.urandom()", "a durable call"),
        ("secrets.token_hex()", "a durable call"),
        ("time.monotonic()", "asyncio.get_running_loop().time()"),
    ]:
        assert f"{source} at " in message, source
        assert replacement in message.split(f"{source} at ", 1)[1].split(";")[0], source
    assert message.count(f"{HERE}:") == 7, message


async def test_warn_mode_logs_once_and_lets_the_call_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "dispatch_aio"):
        async with Environment(dispatch, nondeterminism="warn", replay="always") as env:
            assert len(await env.call(reads_everything)) == 9
    warnings = [r for r in caplog.records if "uuid.uuid4()" in r.getMessage()]
    assert len(warnings) == 1


@dispatch.function
async def leaf_timing() -> float:
    started = time.time()
    await asyncio.sleep(0)
    return time.time() - started


async def test_a_function_that_never_suspends_is_not_held_to_it() -> None:
    async with Environment(dispatch) as env:
        assert await env.call(leaf_timing) >= 0


@dispatch.function
async def forgets_await() -> str:
    r = double(2)  # the un-awaited call
    return f"got {r}"


@dispatch.function
async def awaits_later() -> int:
    pending = double(3)  # awaited after a suspension: valid, but said
    await asyncio.sleep(10)
    return await pending


async def test_an_unawaited_call_fails_the_call_at_the_users_line() -> None:
    line = _line_of("# the un-awaited call")
    async with Environment(dispatch) as env:
        info = await env.run(forgets_await)
    assert info.status is not None and info.status.name == "PERMANENT_ERROR"
    message = str(info.error)
    assert "never awaited" in message and f"'double' at {__file__}:{line}" in message
    assert "await double(...)" in message


async def test_an_unawaited_call_at_a_suspension_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    line = _line_of("# awaited after a suspension")
    with caplog.at_level(logging.WARNING, "dispatch_aio"):
        async with Environment(dispatch) as env:
            assert await env.call(awaits_later) == 6
    [record] = [r for r in caplog.records if "not awaited" in r.getMessage()]
    assert f"{__file__}:{line}" in record.getMessage()


@dispatch.function
async def encodes_a_call() -> bytes:
    return pickle.dumps(double(4))


async def test_a_durable_call_is_never_a_value() -> None:
    async with Environment(dispatch) as env:
        info = await env.run(encodes_a_call)
    assert "is not a value: it was not awaited" in str(info.error)


RUNS: list[int] = []


@dispatch.function
async def diverges_once() -> int:
    RUNS.append(1)  # state outside the journal: the replay takes the other branch
    if len(RUNS) == 1:
        return await double(1)
    return await double(2)


async def test_restart_policy_in_the_environment_counts_divergences() -> None:
    RUNS.clear()
    async with Environment(dispatch, replay="always", on_divergence="restart") as env:
        info = await env.run(diverges_once)
    assert info.output == 4 and info.divergences == 1
