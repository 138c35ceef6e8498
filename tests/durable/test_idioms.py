"""A sweep of asyncio idioms inside durable functions, each with a known result.

Every idiom runs live (the cache keeps runs in memory), with forced replay at each
round, and with forced replay on shuffled delivery split over several rounds, under a
few seeds; each mode must give the result written in the test. The functions and the
types they exchange live at module level (and in `idiom_types`), so that a run resumed
in another process finds them by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import hashlib
import logging
import math
import sys
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dispatch_aio import testing
from dispatch_aio._function import Function
from dispatch_aio.errors import RemoteError
from dispatch_aio.testing import Environment

from .idiom_types import BigBoom, Boom, Color, Level, Pair, Point, Route

# Modes every idiom runs in. A new mode is one more line here.
MODES: dict[str, dict[str, Any]] = {
    "live": {"replay": "cached"},
    "replay": {"replay": "always"},
    **{
        f"shuffle-{seed}": {"replay": "always", "shuffle": True, "split": True, "seed": seed}
        for seed in (1, 2, 3)
    },
}
if "process" in typing.get_args(testing.Replay):
    # A new process for every Run request: forked (milliseconds) on Linux, a new
    # interpreter (some 0.3 s of CPU) elsewhere.
    MODES["process"] = {"replay": "process"}
SLOW_MODES = {"process"}


@pytest.fixture(
    params=[pytest.param(m, marks=[pytest.mark.slow] if m in SLOW_MODES else []) for m in MODES]
)
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    settings = dict(MODES[request.param])
    if settings["replay"] == "process":
        settings["workers"] = request.getfixturevalue("dispatch_workers")
    return settings


class _Leftovers(logging.Handler):
    """Collects, as text only, the errors that runs log or leave to finalizers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"logged: {record.getMessage()[:300]}")

    def unraisable(self, info: Any) -> None:
        where = info.err_msg or "Exception ignored in"
        self.messages.append(f"{where} {info.object!r}: {info.exc_type.__name__}: {info.exc_value}")

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        # Only text is kept: a record or an exception kept whole would hold the task it
        # names, whose coroutine would then be finalized during a later test.
        logger = logging.getLogger("dispatch_aio")
        logger.addHandler(self)
        logger.propagate = False
        hook, sys.unraisablehook = sys.unraisablehook, self.unraisable
        try:
            yield
        finally:
            sys.unraisablehook = hook
            logger.removeHandler(self)
            logger.propagate = True


@pytest.fixture
def run(mode: dict[str, Any]) -> Callable[..., Any]:
    """Run a call in the test's mode, in an environment that knows every function here.

    The environment gets an event loop of its own, closed before the call returns.
    Whatever the runs leave behind (a task still pending, a generator that cannot be
    closed) fails the test that left it, with what asyncio said about it.
    """

    async def call(fn: Function[..., Any], *args: Any, virtual_time: bool = True) -> Any:
        async def body() -> Any:
            # Two attempts are enough to see that a temporary error is retried, then final.
            options = {"virtual_time": virtual_time, "max_attempts": 2, **mode}
            async with Environment(FUNCTIONS, **options) as env:
                return await env.call(fn, *args)

        # pytest keeps the last failure (for post-mortem debugging), and with it what a
        # failed test left behind; that test was reported already.
        sys.last_type = sys.last_value = sys.last_traceback = None
        with _Leftovers().capture():
            gc.collect()
        leftovers = _Leftovers()
        with leftovers.capture():
            result = await asyncio.to_thread(asyncio.run, body())
            gc.collect()
        assert not leftovers.messages, "the runs left work behind:\n" + "\n".join(
            leftovers.messages
        )
        return result

    return call


# -- callees ------------------------------------------------------------------------


async def _echo(value: Any) -> Any:
    return value


async def _nap(seconds: float, value: Any) -> Any:
    await asyncio.sleep(seconds)  # a durable sleep: virtual time jumps over it
    return value


async def _boom(code: int, after: float = 0) -> None:
    if after:
        await asyncio.sleep(after)
    try:
        raise ValueError(f"root cause {code}")
    except ValueError as cause:
        kind = BigBoom if code >= 100 else Boom
        raise kind(code, f"detail {code}") from cause


async def _times_out(what: str) -> None:
    raise TimeoutError(f"{what} took too long")


async def _cancels_itself() -> None:
    raise asyncio.CancelledError("no more")


def _bytes_of(size: int) -> bytes:
    chunk = hashlib.sha256(str(size).encode()).digest()
    return (chunk * (size // len(chunk) + 1))[:size]


def _summary(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()[:16]


async def _blob(size: int) -> bytes:
    return _bytes_of(size)


echo = Function(_echo, name="idioms.echo")
nap = Function(_nap, name="idioms.nap")
boom = Function(_boom, name="idioms.boom")
times_out = Function(_times_out, name="idioms.times_out")
cancels_itself = Function(_cancels_itself, name="idioms.cancels_itself")
blob = Function(_blob, name="idioms.blob")


# -- structured concurrency ------------------------------------------------------------


async def _task_group_failure() -> dict[str, Any]:
    cancelled: list[int] = []

    async def sibling(i: int) -> None:
        try:
            await nap(3600, i)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    caught: list[Any] = []
    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(3):
                tg.create_task(sibling(i))
            tg.create_task(boom(7, after=5))
    except* Boom as group:
        caught.extend(
            (type(e).__name__, isinstance(e, Boom), e.code, e.detail) for e in group.exceptions
        )
    return {"cancelled": sorted(cancelled), "caught": caught}


task_group_failure = Function(_task_group_failure, name="idioms.task_group_failure")


async def test_task_group_with_a_failing_child(run: Callable[..., Any]) -> None:
    assert await run(task_group_failure) == {
        "cancelled": [0, 1, 2],
        "caught": [("Boom", True, 7, "detail 7")],
    }


async def _gather_return_exceptions() -> list[Any]:
    results = await asyncio.gather(echo(1), boom(2), boom(200), return_exceptions=True)
    return [
        (type(r).__name__, isinstance(r, Boom), r.code) if isinstance(r, BaseException) else r
        for r in results
    ]


gather_return_exceptions = Function(
    _gather_return_exceptions, name="idioms.gather_return_exceptions"
)


async def test_gather_return_exceptions(run: Callable[..., Any]) -> None:
    assert await run(gather_return_exceptions) == [1, ("Boom", True, 2), ("BigBoom", True, 200)]


async def _wait_first_exception() -> dict[str, Any]:
    tasks = [
        asyncio.create_task(nap(1, "fast")),
        asyncio.create_task(boom(3, after=5)),
        asyncio.create_task(nap(3600, "slow")),
    ]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    outcomes = sorted(
        f"{type(t.exception()).__name__}:{t.exception()}" if t.exception() else t.result()
        for t in done
    )
    for t in pending:
        t.cancel()
    await asyncio.wait(pending)
    return {"done": outcomes, "pending": len(pending), "slow cancelled": tasks[2].cancelled()}


wait_first_exception = Function(_wait_first_exception, name="idioms.wait_first_exception")


async def test_wait_first_exception(run: Callable[..., Any]) -> None:
    assert await run(wait_first_exception) == {
        "done": ["Boom:boom 3: detail 3", "fast"],
        "pending": 1,
        "slow cancelled": True,
    }


async def _wait_first_completed() -> list[list[str]]:
    pending = {asyncio.create_task(nap(s, f"after {s}")) for s in (30, 10, 20)}
    rounds = []
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        rounds.append(sorted(t.result() for t in done))
    return rounds


wait_first_completed = Function(_wait_first_completed, name="idioms.wait_first_completed")


async def test_wait_first_completed(run: Callable[..., Any]) -> None:
    assert await run(wait_first_completed) == [["after 10"], ["after 20"], ["after 30"]]


async def _wait_with_timeout() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = [asyncio.create_task(nap(s, s)) for s in (10, 100, 5)]
    done, pending = await asyncio.wait(tasks, timeout=30)
    waited = round(loop.time() - start)
    for t in pending:
        t.cancel()
    return {"done": sorted(t.result() for t in done), "pending": len(pending), "waited": waited}


wait_with_timeout = Function(_wait_with_timeout, name="idioms.wait_with_timeout")


async def test_wait_with_timeout(run: Callable[..., Any]) -> None:
    assert await run(wait_with_timeout) == {"done": [5, 10], "pending": 1, "waited": 30}


async def _as_completed_order() -> list[int]:
    return [await f for f in asyncio.as_completed([nap(s, s) for s in (30, 10, 40, 20)])]


as_completed_order = Function(_as_completed_order, name="idioms.as_completed_order")


async def test_as_completed(run: Callable[..., Any]) -> None:
    assert await run(as_completed_order) == [10, 20, 30, 40]


# -- timeouts and cancellation ---------------------------------------------------------


async def _shield_under_timeout() -> dict[str, Any]:
    task = asyncio.create_task(nap(100, "shielded"))
    timed_out = False
    try:
        async with asyncio.timeout(10):
            await asyncio.shield(task)
    except TimeoutError:
        timed_out = True
    return {"timed out": timed_out, "task cancelled": task.cancelled(), "value": await task}


shield_under_timeout = Function(_shield_under_timeout, name="idioms.shield_under_timeout")


async def test_shield_under_timeout(run: Callable[..., Any]) -> None:
    assert await run(shield_under_timeout) == {
        "timed out": True,
        "task cancelled": False,
        "value": "shielded",
    }


async def _timeouts_around_calls() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {}
    try:
        out["wait_for slow"] = await asyncio.wait_for(nap(100, "late"), timeout=10)
    except TimeoutError:
        out["wait_for slow"] = "timeout"
    out["wait_for fast"] = await asyncio.wait_for(nap(1, "in time"), timeout=10)
    try:
        async with asyncio.timeout(10):
            out["timeout slow"] = await nap(100, "late")
    except TimeoutError:
        out["timeout slow"] = "timeout"
    async with asyncio.timeout(10):
        out["timeout fast"] = await nap(1, "in time")
    start = loop.time()
    try:
        async with asyncio.timeout(60):
            await asyncio.sleep(3600)
    except TimeoutError:
        out["sleep 3600 under timeout 60"] = round(loop.time() - start)
    start = loop.time()
    try:
        await asyncio.wait_for(asyncio.sleep(3600), timeout=90)
    except TimeoutError:
        out["sleep 3600 under wait_for 90"] = round(loop.time() - start)
    return out


timeouts_around_calls = Function(_timeouts_around_calls, name="idioms.timeouts_around_calls")


async def test_wait_for_and_timeout_around_calls_and_sleeps(run: Callable[..., Any]) -> None:
    assert await run(timeouts_around_calls) == {
        "wait_for slow": "timeout",
        "wait_for fast": "in time",
        "timeout slow": "timeout",
        "timeout fast": "in time",
        "sleep 3600 under timeout 60": 60,
        "sleep 3600 under wait_for 90": 90,
    }


async def _cancel_a_waiting_task() -> dict[str, Any]:
    log: list[str] = []

    async def worker() -> None:
        try:
            log.append(await nap(3600, "never"))
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append(await echo("cleaned up"))

    task = asyncio.create_task(worker())
    log.append(await nap(1, "tick"))
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        log.append("awaited: CancelledError")
    return {"log": log, "cancelled": task.cancelled()}


cancel_a_waiting_task = Function(_cancel_a_waiting_task, name="idioms.cancel_a_waiting_task")


async def test_cancel_a_task_awaiting_a_call_with_a_finally_that_calls(
    run: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    assert await run(cancel_a_waiting_task) == {
        "log": ["tick", "cancelled", "cleaned up", "awaited: CancelledError"],
        "cancelled": True,
    }


# -- synchronization primitives --------------------------------------------------------


async def _queue_pipeline(n: int) -> dict[str, Any]:
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=2)
    consumed: list[tuple[int, int]] = []

    async def producer() -> None:
        for i in range(n):
            await queue.put(await echo(i))
        for _ in range(2):
            await queue.put(None)

    async def consumer() -> None:
        while (item := await queue.get()) is not None:
            consumed.append((item, await echo(item * item)))

    await asyncio.gather(producer(), consumer(), consumer())
    return {"consumed": sorted(consumed), "left": queue.qsize()}


queue_pipeline = Function(_queue_pipeline, name="idioms.queue_pipeline")


async def test_queue_producer_consumers(run: Callable[..., Any]) -> None:
    assert await run(queue_pipeline, 7) == {
        "consumed": [(i, i * i) for i in range(7)],
        "left": 0,
    }


async def _semaphore_peak(n: int, limit: int) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(limit)
    active = peak = 0

    async def job(i: int) -> int:
        nonlocal active, peak
        async with semaphore:
            active += 1
            peak = max(peak, active)
            try:
                return int(await echo(i))
            finally:
                active -= 1

    results = await asyncio.gather(*(job(i) for i in range(n)))
    return {"peak": peak, "results": list(results)}


semaphore_peak = Function(_semaphore_peak, name="idioms.semaphore_peak")


async def test_semaphore_bounds_concurrency(run: Callable[..., Any]) -> None:
    assert await run(semaphore_peak, 10, 3) == {"peak": 3, "results": list(range(10))}


async def _event_and_condition() -> dict[str, Any]:
    event = asyncio.Event()
    seen: list[str] = []

    async def waiter(name: str) -> None:
        await event.wait()
        seen.append(await echo(name))

    waiters = [asyncio.create_task(waiter(n)) for n in ("a", "b")]
    await nap(5, None)
    before = list(seen)
    event.set()
    await asyncio.gather(*waiters)

    condition = asyncio.Condition()
    items: list[int] = []
    taken: list[int] = []

    async def taker() -> None:
        async with condition:
            await condition.wait_for(lambda: len(items) >= 3)
            taken.extend(items)

    task = asyncio.create_task(taker())
    for i in range(3):
        value = await nap(1, i)
        async with condition:
            items.append(value)
            condition.notify_all()
    await task
    return {"before set": before, "after set": sorted(seen), "taken": taken}


event_and_condition = Function(_event_and_condition, name="idioms.event_and_condition")


async def test_event_and_condition(run: Callable[..., Any]) -> None:
    assert await run(event_and_condition) == {
        "before set": [],
        "after set": ["a", "b"],
        "taken": [0, 1, 2],
    }


TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("idioms_tenant", default="none")


async def _context_into_children() -> dict[str, Any]:
    TENANT.set("acme")

    async def child(suffix: str) -> str:
        seen = TENANT.get()
        TENANT.set(f"{seen}-{suffix}")  # changes the child's copy only
        await echo(suffix)
        return TENANT.get()

    task = asyncio.create_task(child("task"))
    gathered = await asyncio.gather(child("g1"), child("g2"))
    async with asyncio.TaskGroup() as tg:
        grouped = tg.create_task(child("tg"))
    return {
        "task": await task,
        "gathered": list(gathered),
        "group": grouped.result(),
        "parent": TENANT.get(),
    }


context_into_children = Function(_context_into_children, name="idioms.context_into_children")


async def test_contextvars_flow_into_child_tasks(run: Callable[..., Any]) -> None:
    assert await run(context_into_children) == {
        "task": "acme-task",
        "gathered": ["acme-g1", "acme-g2"],
        "group": "acme-tg",
        "parent": "acme",
    }


# -- calls: recursion, generators, context managers ------------------------------------


async def _depth(n: int) -> int:
    return 0 if n == 0 else n + int(await depth(n - 1))


depth = Function(_depth, name="idioms.depth")


async def test_recursion_50_deep(run: Callable[..., Any], request: pytest.FixtureRequest) -> None:
    # Two Run requests per level, one after the other: with a new interpreter for each
    # (some 0.3 s), 50 levels take half a minute; what crossing processes can break
    # shows at any depth.
    n = 8 if request.node.callspec.params["mode"] == "process" else 50
    assert await run(depth, n) == n * (n + 1) // 2


async def _generators_and_managers() -> dict[str, Any]:
    log: list[str] = []

    async def doubles(n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield int(await echo(2 * i))
        finally:
            log.append(await echo("generator closed"))

    @contextlib.asynccontextmanager
    async def resource(name: str) -> AsyncIterator[str]:
        log.append(await echo(f"open {name}"))
        try:
            yield name.upper()
        finally:
            log.append(await echo(f"close {name}"))

    all_of_them = [x async for x in doubles(4)]
    async with contextlib.aclosing(doubles(100)) as gen:
        first_two = [x async for x, _ in zip_async(gen, range(2))]
    async with resource("db") as db, resource("cache") as cache:
        inside = [db, cache]
    try:
        async with resource("failing"):
            await boom(5)
    except Boom as exc:
        log.append(f"caught {exc.code}")
    return {"all": all_of_them, "first two": first_two, "inside": inside, "log": log}


async def zip_async(gen: AsyncIterator[int], limit: range) -> AsyncIterator[tuple[int, int]]:
    """Pair the items of ``gen`` with ``limit``, stopping at the shorter (without closing)."""
    for i in limit:
        try:
            item = await anext(gen)
        except StopAsyncIteration:
            return
        yield item, i


generators_and_managers = Function(_generators_and_managers, name="idioms.generators_and_managers")


async def test_async_generators_and_context_managers(
    run: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    # With a new interpreter per request too: the worker tears its run down after
    # answering, and finalizing the generator it suspended in raises "aclose():
    # asynchronous generator is already running".
    assert await run(generators_and_managers) == {
        "all": [0, 2, 4, 6],
        "first two": [0, 2],
        "inside": ["DB", "CACHE"],
        "log": [
            "generator closed",
            "generator closed",
            "open db",
            "open cache",
            "close cache",
            "close db",
            "open failing",
            "close failing",
            "caught 5",
        ],
    }


# -- errors and values across calls ----------------------------------------------------


async def _errors_across_calls() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        await boom(7)
    except Boom as exc:
        cause = exc.__cause__
        out["boom"] = {
            "type": type(exc).__name__,
            "code": exc.code,
            "detail": exc.detail,
            "str": str(exc),
            "cause": f"{type(cause).__name__}: {cause}" if cause else None,
        }
    try:
        await boom(101)
    except Boom as exc:
        out["subclass caught as Boom"] = (type(exc).__name__, isinstance(exc, BigBoom), exc.code)
    try:
        await times_out("the report")
    except TimeoutError as exc:
        out["TimeoutError"] = str(exc)
    try:
        await cancels_itself()
    except RemoteError as exc:
        out["CancelledError"] = exc.type_name
    out["still running"] = await echo("yes")
    return out


errors_across_calls = Function(_errors_across_calls, name="idioms.errors_across_calls")


async def test_exceptions_reach_the_caller_as_raised(run: Callable[..., Any]) -> None:
    assert await run(errors_across_calls) == {
        "boom": {
            "type": "Boom",
            "code": 7,
            "detail": "detail 7",
            "str": "boom 7: detail 7",
            "cause": "ValueError: root cause 7",
        },
        "subclass caught as Boom": ("BigBoom", True, 101),
        "TimeoutError": "the report took too long",
        # A callee that cancelled itself is an error the caller catches; the caller's
        # own task is not cancelled by it.
        "CancelledError": "CancelledError",
        "still running": "yes",
    }


async def _values_across_calls() -> dict[str, Any]:
    route = Route("loop", [Point(1, 2), Point(-3, 4)])
    back = await echo(route)
    pair = await echo(Pair(3, "three"))
    color, level = await echo(Color.GREEN), await echo(Level.HIGH)
    nested = await echo({"points": [Point(0, 1)], "colors": (Color.RED,), "pair": pair})
    return {
        "route": (type(back).__name__, isinstance(back, Route), back == route),
        "stops are Points": all(isinstance(p, Point) for p in back.stops),
        "norms": [p.norm1() for p in back.stops],
        "pair": (isinstance(pair, Pair), pair.right, pair == (3, "three")),
        "color": (color is Color.GREEN, isinstance(color, Color)),
        "level": (level is Level.HIGH, level == 2),
        "nested": (
            isinstance(nested["points"][0], Point),
            nested["colors"][0] is Color.RED,
            isinstance(nested["pair"], Pair),
        ),
    }


values_across_calls = Function(_values_across_calls, name="idioms.values_across_calls")


async def test_dataclasses_enums_and_named_tuples(run: Callable[..., Any]) -> None:
    assert await run(values_across_calls) == {
        "route": ("Route", True, True),
        "stops are Points": True,
        "norms": [3, 7],
        "pair": (True, "three", True),
        "color": (True, True),
        "level": (True, True),
        "nested": (True, True, True),
    }


async def test_a_value_returned_to_the_test_keeps_its_class(run: Callable[..., Any]) -> None:
    point = await run(echo, Point(5, 6))
    assert isinstance(point, Point)
    assert point == Point(5, 6)


async def _large_results(sizes: list[int]) -> list[tuple[int, str]]:
    # Sequential calls: each large result sits in the journal while the next one runs.
    return [_summary(await blob(size)) for size in sizes]


large_results = Function(_large_results, name="idioms.large_results")


@pytest.mark.parametrize("megabytes", [1, 10])
async def test_large_results(run: Callable[..., Any], megabytes: int) -> None:
    sizes = [megabytes * 1_000_000, 10]
    assert await run(large_results, sizes) == [_summary(_bytes_of(n)) for n in sizes]


# -- I/O -------------------------------------------------------------------------------


async def _threads() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    total = await asyncio.to_thread(sum, range(10))
    factorial = await loop.run_in_executor(None, math.factorial, 10)
    doubled = await echo(2 * total)
    both = await asyncio.gather(asyncio.to_thread(len, "four"), echo("call"))
    return {"to_thread": total, "executor": factorial, "call": doubled, "both": list(both)}


threads = Function(_threads, name="idioms.threads")


async def test_to_thread_and_run_in_executor(run: Callable[..., Any]) -> None:
    assert await run(threads, virtual_time=False) == {
        "to_thread": 45,
        "executor": 3628800,
        "call": 90,
        "both": [4, "call"],
    }


async def _subprocess() -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        # Still running when communicate() waits for it, as most processes are.
        "import sys, time; print('one', flush=True); time.sleep(0.05); print('two'); sys.exit(3)",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    lines = out.decode().split()
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; print('a', flush=True); time.sleep(0.05); print('b')",
        stdout=asyncio.subprocess.PIPE,
    )
    assert reader.stdout is not None
    streamed = [line.decode().strip() async for line in reader.stdout]
    code = await reader.wait()
    return {"lines": lines, "returncode": proc.returncode, "streamed": streamed, "wait": code}


subprocess_idiom = Function(_subprocess, name="idioms.subprocess")


async def test_subprocesses(run: Callable[..., Any]) -> None:
    assert await run(subprocess_idiom, virtual_time=False) == {
        "lines": ["one", "two"],
        "returncode": 3,
        "streamed": ["a", "b"],
        "wait": 0,
    }


@pytest.fixture
async def http_server() -> AsyncIterator[str]:
    async def greet(request: web.Request) -> web.Response:
        return web.json_response({"hello": request.query.get("name", "world")})

    app = web.Application()
    app.router.add_get("/greet", greet)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def _http_client(url: str) -> list[Any]:
    out = []
    async with aiohttp.ClientSession() as session:
        for name in ("a", "b"):
            async with session.get(f"{url}/greet", params={"name": name}) as response:
                body = await response.json()
            out.append((response.status, body["hello"], await echo(name.upper())))
    return out


http_client = Function(_http_client, name="idioms.http_client")


async def test_aiohttp_client_session(
    run: Callable[..., Any], http_server: str, request: pytest.FixtureRequest
) -> None:
    assert await run(http_client, http_server, virtual_time=False) == [
        (200, "a", "A"),
        (200, "b", "B"),
    ]


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _stream_client(port: int) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for word in ("ping", "pong"):
            writer.write(f"{word}\n".encode())
            await writer.drain()
            out.append((await reader.readline()).decode().strip())
            out.append(await echo(word))
    finally:
        writer.close()
        await writer.wait_closed()
    return out


stream_client = Function(_stream_client, name="idioms.stream_client")


async def test_open_connection(
    run: Callable[..., Any], echo_server: int, request: pytest.FixtureRequest
) -> None:
    assert await run(stream_client, echo_server, virtual_time=False) == [
        "PING",
        "ping",
        "PONG",
        "pong",
    ]


FUNCTIONS = [obj for obj in list(globals().values()) if isinstance(obj, Function)]
