"""The examples' functions with every Run request in a new interpreter (replay="process").

As a scheduler that restarts the app before every resume would run them: each worker
loads the example from its file, so values and errors cross a process boundary at
every round. State kept in memory between requests does not survive that (as it
would not survive a restart), so the failures example's flaky seat service, which
counts attempts in a global, is stubbed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from dispatch_aio.testing import Environment, WorkerPool

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_getting_started(
    load: Callable[[str], ModuleType], dispatch_workers: WorkerPool
) -> None:
    example = load("getting_started")
    async with Environment(example.dispatch, replay="process", workers=dispatch_workers) as env:
        assert await env.call(example.greet, "World") == "Hello, World!"


async def test_fan_out(load: Callable[[str], ModuleType], dispatch_workers: WorkerPool) -> None:
    example = load("fan_out")
    async with Environment(example.dispatch, replay="process", workers=dispatch_workers) as env:
        assert await env.call(example.sum_of_squares, 10) == 385
        assert await env.call(example.total_words, example.DOCUMENTS) == 17


async def test_timers(load: Callable[[str], ModuleType], dispatch_workers: WorkerPool) -> None:
    example = load("timers")
    async with Environment(example.dispatch, replay="process", workers=dispatch_workers) as env:
        six_days = 6 * 24 * 3600  # under the 7 days after which a call expires
        begin = env.time()
        reminder = await env.call(example.remind, "water the plants", six_days)
        assert reminder == f"reminder after {six_days} s: water the plants"
        assert env.time() - begin >= six_days

        quote = await env.call(example.quote, "coffee")
        assert quote == "coffee: no quote within 1 s, using the list price"

        async def fast_quote(item: str) -> float:
            return 4.5

        env.stub(example.slow_quote, fast_quote)
        assert await env.call(example.quote, "tea") == "tea: 4.5"


async def test_failures(load: Callable[[str], ModuleType], dispatch_workers: WorkerPool) -> None:
    example = load("failures")
    tries: list[str] = []

    async def flaky_reserve_seat(flight: str) -> str:
        tries.append(flight)
        if len(tries) < 3:
            raise ConnectionError("the seat service is unreachable")
        return f"seat 12A on {flight} (attempt {len(tries)})"

    async with Environment(example.dispatch, replay="process", workers=dispatch_workers) as env:
        env.stub(example.reserve_seat, flaky_reserve_seat)
        booked = await env.call(example.book, "DA 101", "4242-4242-4242-4242")
        assert booked.startswith("booked seat 12A on DA 101 (attempt 3)")

        # `except PaymentDeclined` in book, in a new interpreter, catches charge's error.
        declined = await env.call(example.book, "DA 202", "4000-0000-0000-0000")
        assert declined == "not booked: card 4000-0000-0000-0000 declined"
        charges = env.calls(example.charge)
        assert isinstance(charges[1].error, example.PaymentDeclined)
        assert len(env.calls(example.release_seat)) == 1


async def test_background_jobs(
    load: Callable[[str], ModuleType],
    dispatch_workers: WorkerPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    example = load("background_jobs")
    caplog.set_level(logging.INFO, logger="jobs")
    async with Environment(example.dispatch, replay="process", workers=dispatch_workers) as env:
        lines = await env.call(example.nightly_export, ["acme", "globex"])
    pattern = r"{}: {} records in {} batches \({} s, job [0-9a-f]{{8}}\)"
    assert re.fullmatch(pattern.format("acme", 250, 3, 3), lines[0]), lines
    assert re.fullmatch(pattern.format("globex", 120, 2, 2), lines[1]), lines
    # Logged by the workers, once per job however many times each job was replayed.
    messages = [r.getMessage() for r in caplog.records if r.name == "jobs"]
    assert sorted(m.rpartition(" ")[2] for m in messages) == ["acme", "globex"], messages


async def test_approval(load: Callable[[str], ModuleType], dispatch_workers: WorkerPool) -> None:
    example = load("approval")
    async with Environment(example.dispatch, replay="process", workers=dispatch_workers) as env:
        await env.send_event("approval-C1", {"approved": True, "by": "ann"})
        assert await env.call(example.place_order, "C1", 10) == "order C1: charged 10 EUR"
        cancelled = await env.call(example.place_order, "C2", 20)
        assert cancelled == "order C2: cancelled (not approved within 24 h)"
