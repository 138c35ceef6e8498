"""The pytest plugin: dispatch_env fixture in auto and strict modes, options and marker."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

APP = """
import asyncio
import pytest
from dispatch_aio import Dispatch

dispatch = Dispatch()

@dispatch.function
async def double(x: int) -> int:
    return 2 * x

@dispatch.function
async def total(n: int) -> int:
    parts = await asyncio.gather(*(double(i) for i in range(n)))
    await asyncio.sleep(3600)
    return sum(parts)
"""

TESTS = """
{marker}
async def test_total(dispatch_env):
    env = dispatch_env(dispatch)
    assert await env.call(total, 4) == 12
    mode = "always" if env._runner.cache_size == 0 else "cached"
    print(f"MODE={{mode}} SHUFFLE={{env._shuffle}}")
"""


@pytest.mark.parametrize("asyncio_mode", ["auto", "strict"])
def test_fixture_in_both_asyncio_modes(pytester: pytest.Pytester, asyncio_mode: str) -> None:
    marker = "@pytest.mark.asyncio" if asyncio_mode == "strict" else ""
    pytester.makepyfile(test_app=APP + TESTS.format(marker=marker))
    result = pytester.runpytest_subprocess(
        "-s", "-p", "no:cacheprovider", f"--asyncio-mode={asyncio_mode}"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*MODE=cached SHUFFLE=False*"])


def test_session_options_and_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_app=APP
        + TESTS.format(marker="")
        + TESTS.format(marker='@pytest.mark.dispatch(replay="cached")').replace(
            "test_total", "test_marked"
        )
    )
    result = pytester.runpytest_subprocess(
        "-s",
        "-p",
        "no:cacheprovider",
        "--asyncio-mode=auto",
        "--dispatch-replay=always",
        "--dispatch-shuffle",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*MODE=always SHUFFLE=True*", "*MODE=cached SHUFFLE=True*"])


def test_a_session_in_new_processes(pytester: pytest.Pytester) -> None:
    """--dispatch-replay=process: the session's environments share one pool of workers."""
    pytester.makepyfile(
        test_app=APP
        + """
import os

@dispatch.function
async def pid() -> int:
    return os.getpid()

async def test_one(dispatch_env, dispatch_workers):
    env = dispatch_env(dispatch)
    assert await env.call(total, 4) == 12
    assert await env.call(pid) != os.getpid()
    assert env._workers is dispatch_workers

async def test_two(dispatch_env, dispatch_workers):
    env = dispatch_env(dispatch)
    assert await env.call(pid) != os.getpid()
    assert env._workers is dispatch_workers
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--asyncio-mode=auto", "--dispatch-replay=process"
    )
    result.assert_outcomes(passed=2)
