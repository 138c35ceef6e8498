"""Letting go of a suspended run never runs the function's cleanup code.

A run is let go of when the live cache evicts it (idle timeout, size), when
forced replay drops it at every round, or when a resume replaces it. Its
``finally:`` and ``except CancelledError:`` blocks must run once, at the real
end of the function, in whichever run gets there. (Runs let go of are parked
until the runner closes, when they are discarded: that is not checked here.)
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from typing import Any

import pytest

from dispatch_aio._function import Function
from dispatch_aio.testing import Environment


async def _double(x: int) -> int:
    return 2 * x


double = Function(_double, name="double")


def _note(path: str, line: str) -> None:
    with open(path, "a") as file:
        file.write(line + "\n")


async def _with_cleanup(path: str) -> int:
    async def background() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            _note(path, "background cancelled")
            raise

    task = asyncio.create_task(background())
    try:
        total = await double(1) + await double(2) + await double(3)
    except asyncio.CancelledError:
        _note(path, "main cancelled")
        raise
    finally:
        _note(path, "cleanup")
    task.cancel()
    return total


with_cleanup = Function(_with_cleanup, name="with_cleanup")


@pytest.mark.parametrize(
    "options",
    [
        {"replay": "always"},
        {"replay": "always", "shuffle": True, "split": True, "seed": 3},
        {"cache_idle_timeout": 0.0},
        {"cache_size": 1},
    ],
)
async def test_cleanup_runs_once_at_the_real_end(
    options: dict[str, Any], tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "effects.txt"
    runner_options = {
        key: options.pop(key) for key in ("cache_idle_timeout", "cache_size") if key in options
    }
    with caplog.at_level(logging.ERROR):
        async with Environment([with_cleanup, double], **options) as env:
            for name, value in runner_options.items():
                setattr(env._runner, name, value)
            # Two calls at once: with a cache of one, each evicts the other.
            results = await asyncio.gather(
                env.call(with_cleanup, str(path)), env.call(with_cleanup, str(path))
            )
            effects = sorted(path.read_text().splitlines())
    assert results == [12, 12]
    # Once per call, at its end: the background task is cancelled by the function.
    assert effects == ["background cancelled"] * 2 + ["cleanup"] * 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and _mine(r)]


def _mine(record: logging.LogRecord) -> bool:
    """Whether a record is about a run of this test (not garbage of earlier tests)."""
    context = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else None
    task = context.get("task") if isinstance(context, dict) else None
    if task is None:
        return True
    owner = getattr(task.get_loop(), "owner", None)
    return getattr(owner, "function", None) in ("with_cleanup", "double")
