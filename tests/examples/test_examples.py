"""The examples: each run to completion by ``dispatch-aio run``, alone, and in process.

The first test of each example runs it as a user would, both ways: as a subprocess of
the real ``dispatch-aio run`` command (its local scheduler, real HTTP, signed
requests), and as a plain ``python example.py`` (its embedded scheduler, on a data
folder of its own); it checks the exit status and what it printed. The in-process tests
run the same functions on `dispatch_aio.testing.Environment`, on virtual time and with
replays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from e2e.harness import Starter
from ports import free_port

from dispatch_aio.errors import NondeterminismError
from dispatch_aio.testing import Environment, check_determinism

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DISPATCH_AIO = str(Path(sys.executable).parent / "dispatch-aio")
LINE = re.compile(r"(\S+)\s*\| (.*)")


@pytest.fixture(params=["scheduler", "alone"])
def how(request: pytest.FixtureRequest) -> str:
    """How an example runs: under ``dispatch-aio run``, or alone with its own scheduler."""
    return str(request.param)


def run_example(
    procs: Starter, tmp_path: Path, name: str, how: str = "scheduler", timeout: float = 30
) -> list[str]:
    """Run examples/`name`.py with ``dispatch-aio run`` or alone; return what it printed."""
    if how == "alone":
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        env["DISPATCH_ENDPOINT_ADDR"] = f"127.0.0.1:{free_port()}"  # for aiohttp_app
        proc = procs([sys.executable, str(EXAMPLES / f"{name}.py")], cwd=tmp_path, env=env)
        assert proc.wait(timeout) == 0, proc.dump()
        assert "Traceback" not in proc.stdout + proc.stderr, proc.dump()
        if "logging.basicConfig" not in (EXAMPLES / f"{name}.py").read_text("utf-8"):
            # Printed while logging is not configured; otherwise logged at INFO.
            assert "with the embedded scheduler" in proc.stderr, proc.dump()
        assert (tmp_path / ".dispatch" / "scheduler.db").exists()
        return list(proc.out)
    command = [
        *(DISPATCH_AIO, "run", "--in-memory", "--endpoint", f"127.0.0.1:{free_port()}"),
        *("--", sys.executable, str(EXAMPLES / f"{name}.py")),
    ]
    proc = procs(command, cwd=tmp_path)
    assert proc.wait(timeout) == 0, proc.dump()
    assert "Traceback" not in proc.stdout + proc.stderr, proc.dump()
    return [m[2] for line in proc.out if (m := LINE.fullmatch(line)) and m[1] == name]


def test_every_example_has_a_header_and_a_test() -> None:
    tested = {
        name.removeprefix("test_").removesuffix("_runs")
        for name in globals()
        if name.startswith("test_") and name.endswith("_runs")
    }
    examples = {path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("_")}
    assert examples == tested
    for name in examples:
        source = (EXAMPLES / f"{name}.py").read_text("utf-8")
        assert source.startswith(f"# examples/{name}.py\n#\n"), name
        assert f"dispatch-aio run -- python examples/{name}.py" in source, name


# -- getting_started ------------------------------------------------------------------------


def test_getting_started_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "getting_started", how) == ["Hello, World!"]


async def test_getting_started_in_process(load: Callable[[str], ModuleType]) -> None:
    example = load("getting_started")
    async with Environment(example.dispatch) as env:
        assert await env.call(example.greet, "World") == "Hello, World!"


# -- fan_out --------------------------------------------------------------------------------


def test_fan_out_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "fan_out", how) == [
        "sum of squares of 1..100: 338350",
        "words in 3 documents: 17",
    ]


async def test_fan_out_in_process(load: Callable[[str], ModuleType]) -> None:
    example = load("fan_out")
    # Results delivered in random order, over several rounds, replayed at every round.
    async with Environment(example.dispatch, replay="always", shuffle=True, split=True) as env:
        assert await env.call(example.sum_of_squares, 100) == 338350
        assert len(env.calls(example.square)) == 100
    assert await check_determinism(example.dispatch, example.total_words, example.DOCUMENTS) == 17


async def test_replay_checker_catches_a_nondeterministic_variant(
    load: Callable[[str], ModuleType],
) -> None:
    example = load("fan_out")

    @example.dispatch.function
    async def squares_in_any_order(n: int) -> list[int]:
        # Deliberately non-deterministic: the order of the calls comes from the
        # process's random generator instead of dispatch_aio.random().
        order = random.sample(range(1, n + 1), n)
        return [await example.square(i) for i in order]

    # Caught at the read itself (random.sample), or else by the divergence it causes.
    pattern = "diverged from its journal|reads values that differ on replay"
    with pytest.raises(NondeterminismError, match=pattern) as info:
        await check_determinism(example.dispatch, squares_in_any_order, 6)
    assert "test_examples.py:" in str(info.value)  # the call site


# -- pipeline -------------------------------------------------------------------------------


def test_pipeline_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "pipeline", how) == [
        "inbox: 503, try again later",
        "inbox: received {'words': 13, 'top': {'the': 5, 'scheduler': 2, 'step': 2}}",
        "published as report-2",
    ]


# -- aiohttp_app ----------------------------------------------------------------------------


def test_aiohttp_app_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "aiohttp_app", how) == [
        "GET / -> 202",
        "welcome email sent to grace@example.com",
    ]


# -- fastapi_app ----------------------------------------------------------------------------


def test_fastapi_app_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "fastapi_app", how) == [
        "GET / -> 202",
        "welcome email sent to grace@example.com",
    ]


# -- timers ---------------------------------------------------------------------------------


def test_timers_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    started = time.monotonic()
    quote, reminder = run_example(procs, tmp_path, "timers", how)
    assert quote == "coffee: no quote within 1 s, using the list price"
    # Real time, this time: the scheduler may wake the function up a little late.
    assert re.fullmatch(r"reminder after [34] s: stand up and stretch", reminder)
    assert time.monotonic() - started >= 3


async def test_timers_in_process(load: Callable[[str], ModuleType]) -> None:
    example = load("timers")
    started = time.monotonic()
    async with Environment(example.dispatch, replay="always") as env:
        begin = env.time()
        reminder = await env.call(example.remind, "stand up and stretch", 3)
        assert reminder == "reminder after 3 s: stand up and stretch"
        assert env.time() - begin >= 3
        # The sleep suspended the function: the endpoint asked to be woken up later.
        polls = [r.poll for r in env.responses if r.WhichOneof("directive") == "poll"]
        assert [poll.max_wait.seconds for poll in polls] == [3]

        quote = await env.call(example.quote, "coffee")
        assert quote == "coffee: no quote within 1 s, using the list price"

        async def fast_quote(item: str) -> float:
            return 4.5

        env.stub(example.slow_quote, fast_quote)
        assert await env.call(example.quote, "tea") == "tea: 4.5"

        six_days = 6 * 24 * 3600  # under the 7 days after which a call expires
        reminder = await env.call(example.remind, "water the plants", six_days)
        assert reminder == f"reminder after {six_days} s: water the plants"
    assert time.monotonic() - started < 2  # virtual time: six days pass at once


# -- failures -------------------------------------------------------------------------------


def test_failures_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "failures", how) == [
        "booked seat 12A on DA 101 (attempt 3), charged 420.00 to 4242-4242-4242-4242",
        "seat on DA 202 released",
        "not booked: card 4000-0000-0000-0000 declined",
        "charge failed: PaymentDeclined('card 4000-0000-0000-0000 declined')",
    ]


async def test_failures_in_process(load: Callable[[str], ModuleType]) -> None:
    example = load("failures")
    async with Environment(example.dispatch, replay="always") as env:
        booked = await env.call(example.book, "DA 101", "4242-4242-4242-4242")
        assert booked.startswith("booked seat 12A on DA 101 (attempt 3)")
        [seat] = env.calls(example.reserve_seat)
        assert seat.attempts == 2  # retried twice after the ConnectionError

        declined = await env.call(example.book, "DA 202", "4000-0000-0000-0000")
        assert declined == "not booked: card 4000-0000-0000-0000 declined"
        charges = env.calls(example.charge)
        assert [c.attempts for c in charges] == [0, 0]  # never retried
        assert isinstance(charges[1].error, example.PaymentDeclined)
        assert len(env.calls(example.release_seat)) == 1

        with pytest.raises(example.PaymentDeclined, match="declined"):
            await env.call(example.charge, "4000-0000-0000-0000", 5.0)


# -- background_jobs ------------------------------------------------------------------------


def job_line(tenant: str, records: int, batches: int, seconds: int | str) -> str:
    """The pattern of a line of the background_jobs example."""
    return rf"{tenant}: {records} records in {batches} batches \({seconds} s, job [0-9a-f]{{8}}\)"


def test_background_jobs_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    lines = run_example(procs, tmp_path, "background_jobs", how)
    # Real time: the scheduler may wake a job up a little late.
    expected = [job_line("acme", 250, 3, "[34]"), job_line("globex", 120, 2, "[23]")]
    expected.append(job_line("initech", 180, 2, "[23]"))
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), line


async def test_background_jobs_in_process(
    load: Callable[[str], ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    example = load("background_jobs")
    caplog.set_level(logging.INFO, logger="jobs")
    async with Environment(example.dispatch, replay="always", shuffle=True) as env:
        lines = await env.call(example.nightly_export, ["acme", "globex"])
    assert re.fullmatch(job_line("acme", 250, 3, 3), lines[0]), lines
    assert re.fullmatch(job_line("globex", 120, 2, 2), lines[1]), lines
    # Every round replayed the jobs from the start, yet each logged once, with the same id.
    messages = [r.getMessage() for r in caplog.records if r.name == "jobs"]
    assert len(messages) == 2, messages
    assert {m.rpartition(" ")[2] for m in messages} == {"acme", "globex"}
    ids = {m.split()[1].rstrip(":") for m in messages}
    assert ids == {line.rpartition("job ")[2].rstrip(")") for line in lines}


# -- approval -------------------------------------------------------------------------------


def test_approval_runs(procs: Starter, tmp_path: Path, how: str) -> None:
    assert run_example(procs, tmp_path, "approval", how) == [
        "schedule nightly-report: '0 2 * * *' UTC",
        "GET /approve/A17 -> 200",
        "POST /approve/A17 -> 200: order A17: decision recorded",
        "POST /approve/A17 -> 409: order A17 was decided already",
        "order A17: charged 120 EUR",
    ]


async def test_approval_in_process(load: Callable[[str], ModuleType]) -> None:
    example = load("approval")
    async with Environment(example.dispatch, replay="always") as env:
        # Approved while the order waits.
        waiting = asyncio.ensure_future(env.call(example.place_order, "B1", 30))
        await env.until_waiting("approval-B1")
        await env.send_event("approval-B1", {"approved": True, "by": "ann"})
        assert await waiting == "order B1: charged 30 EUR"
        # Rejected before the order was even placed: the decision waits for it.
        await env.send_event("approval-B2", {"approved": False, "by": "bob"})
        assert (
            await env.call(example.place_order, "B2", 40) == "order B2: cancelled (rejected by bob)"
        )
        # Nobody decides: after 24 h of virtual time the order is cancelled.
        started = env.time()
        cancelled = await env.call(example.place_order, "B3", 50)
        assert cancelled == "order B3: cancelled (not approved within 24 h)"
        assert env.time() - started == pytest.approx(example.APPROVAL_TIMEOUT, abs=2)
        # The nightly report, on virtual time: one run a day, at 02:00 UTC.
        env.schedule(example.nightly_report, cron="0 2 * * *")
        fired = await env.run_for(3 * 24 * 3600)
        assert len(fired) == 3
        assert all(info.output.startswith("nightly report of ") for info in fired)
