"""Plain ``def`` functions: leaf functions run in a thread or a process pool.

Over real HTTP (the endpoint driven as a scheduler drives it) and with the embedded
scheduler on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from endpoint_driver import Driver, Outcome

import dispatch_aio
from dispatch_aio import Dispatch, Status
from dispatch_aio._signature import public_key_to_base64
from dispatch_aio.testing import Environment

dispatch = Dispatch(env={}, api_url="http://127.0.0.1:9", endpoint_addr="127.0.0.1:0")


@dispatch.function(executor="process")
def pid_and_square(x: int) -> tuple[int, int]:
    """Runs in a pool process: module level, found there by name."""
    return os.getpid(), x * x


@dispatch.function(executor="process")
def crash(log: str) -> None:
    """Ends its pool process without an answer, as a crash or a kill would."""
    with open(log, "a") as out:
        out.write("ran\n")
    os._exit(3)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_registration_of_plain_functions_and_its_errors() -> None:
    app = Dispatch(env={})

    @app.function
    def blocking(x: int) -> int:
        return x

    assert blocking.is_sync and blocking.name.endswith("blocking")
    with pytest.raises(TypeError, match="executor= applies to plain `def` functions only"):

        @app.function(executor="thread")
        async def not_sync() -> None: ...

    with pytest.raises(ValueError, match="executor must be 'thread' or 'process'"):
        Dispatch(env={}).function(executor="fork")(blocking.__wrapped__)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="defined inside a function: executor='process'"):

        @app.function(executor="process")
        def local() -> None: ...

    with pytest.raises(TypeError, match="is a generator function"):

        @app.function
        def gen() -> object:
            yield 1


async def test_outside_a_run_a_plain_function_is_awaited_and_runs_in_a_thread() -> None:
    app = Dispatch(env={})

    @app.function
    def where() -> str:
        return threading.current_thread().name

    assert await where() != threading.current_thread().name


async def test_over_http_a_durable_function_awaits_threads_and_processes(
    session: aiohttp.ClientSession,
) -> None:
    key = Ed25519PrivateKey.generate()
    app = Dispatch(
        env={},
        api_url="http://127.0.0.1:9",
        endpoint_addr="127.0.0.1:0",
        verification_key=public_key_to_base64(key.public_key()),
    )
    main_thread = threading.get_ident()

    @app.function(name="block")
    def block(seconds: float) -> bool:
        time.sleep(seconds)  # blocks its thread, not the event loop
        assert not dispatch_aio.in_durable_function()  # a leaf: no durable calls here
        return threading.get_ident() != main_thread

    @app.function(name="fails")
    def fails(x: int) -> int:
        raise ValueError(f"bad {x}")

    @app.function(name="parent")
    async def parent() -> list[bool]:
        return list(await asyncio.gather(block(0.2), block(0.2), block(0.2)))

    async with app, await app.start() as server:
        driver = Driver(session, server.url, key=key)
        began = time.monotonic()
        assert await driver.call("parent") == Outcome(Status.OK, [True, True, True])
        assert time.monotonic() - began < 2
        failed = await driver.call("fails", 3)
        assert failed.status is Status.INVALID_ARGUMENT
        assert str(failed.error) == "bad 3"
        assert await driver.call("block", 0.0) == Outcome(Status.OK, True)


async def test_embedded_dispatch_and_durable_calls_of_thread_and_process_functions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_DATA_DIR", str(tmp_path))
    app = Dispatch(env={"DISPATCH_DATA_DIR": str(tmp_path)})
    app.function(name="pid_and_square", executor="process")(pid_and_square.__wrapped__)

    @app.function(name="double")
    def double(x: int) -> int:
        return 2 * x

    @app.function(name="total")
    async def total(n: int) -> tuple[int, list[int]]:
        doubled = await asyncio.gather(*(double(i) for i in range(n)))
        pids = [pid for pid, _ in [await app.functions["pid_and_square"](3)]]
        return sum(doubled), pids

    async with await app.start():
        assert await app.client.result(await double.dispatch(21), timeout=30) == 42
        result = await app.client.result(await total.dispatch(4), timeout=30)
        assert result[0] == 12
        assert result[1][0] != os.getpid()  # ran in a pool process
        pid, square = await app.client.result(
            await app.functions["pid_and_square"].dispatch(5), timeout=30
        )
        assert (square, pid != os.getpid()) == (25, True)


async def test_a_blocking_def_finishes_on_the_testing_environment_s_virtual_time() -> None:
    # The thread's work is invisible to the event loop: virtual time must not jump to the
    # call's expiration (7 days) while it runs.
    app = dispatch_aio.Dispatch(env={})

    @app.function
    def blocking(x: int) -> int:
        time.sleep(0.05)
        return x

    @app.function
    async def fan() -> list[int]:
        return list(await asyncio.gather(*(blocking(i) for i in range(4))))

    async with Environment(app) as env:
        before = env.clock.time()
        info = await env.run(fan)
        assert env.clock.time() - before < 60
    assert (info.output, info.error) == ([0, 1, 2, 3], None)


async def test_a_process_that_dies_is_named_retried_and_replaced(tmp_path: Path) -> None:
    app = Dispatch(env={"DISPATCH_DATA_DIR": str(tmp_path)})
    retry = dispatch_aio.RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    app.function(name="crash", executor="process", retry=retry)(crash.__wrapped__)
    app.function(name="pid_and_square", executor="process")(pid_and_square.__wrapped__)

    async with await app.start():
        log = tmp_path / "crash.log"
        with pytest.raises(BrokenProcessPool) as info:
            await app.client.result(await app.functions["crash"].dispatch(str(log)), timeout=60)
        # The pool that broke was replaced: the next call runs.
        _, square = await app.client.result(
            await app.functions["pid_and_square"].dispatch(5), timeout=30
        )
    message = str(info.value)
    assert "the process that runs 'crash' (executor='process')" in message
    assert "ended without an answer" in message
    assert 'must be under `if __name__ == "__main__":`' in message
    # Retried: a process that died is a temporary failure, up to the policy's attempts.
    assert log.read_text() == "ran\n" * 2
    assert square == 25


SCRIPT = """\
import asyncio
import json
import os

from dispatch_aio import Dispatch

dispatch = Dispatch()


@dispatch.function(executor="process")
def pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


@dispatch.function
async def work(x: int) -> list:
    return [await pid_and_square(x), os.getpid()]


async def main() -> None:
    async with await dispatch.start():
        print(json.dumps(await dispatch.client.result(await work.dispatch(7))))


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_process_function_of_a_script_runs_in_a_pool_process(tmp_path: Path) -> None:
    # The function lives in the script's __main__: forked pool processes have it, and
    # those Python starts afresh (3.14 and later) import the script again to find it.
    (tmp_path / "app.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    [[pool_pid, square], app_pid] = json.loads(done.stdout.decode().splitlines()[-1])
    assert square == 49
    assert pool_pid != app_pid
