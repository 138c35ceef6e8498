from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dispatch_aio._function import Function
from dispatch_aio.testing import Environment, WorkerPool

# Every durable test runs with the live cache, with forced replay at each round,
# with shuffled delivery split over several rounds, and with every Run request in
# a new Python process (values cross a process boundary at each resume).
MODES: dict[str, dict[str, Any]] = {
    "live": {},
    "replay": {"replay": "always"},
    "shuffle": {"shuffle": True, "split": True, "seed": 7},
    "process": {"replay": "process"},
}

# Tests left out of the "process" mode: functions made inside a test cannot be
# imported by name in a new process.
NOT_IN_NEW_PROCESSES: dict[str, str] = {
    "test_io.py::test_host_loop_object": "closures",
    "test_io.py::test_host_loop_error_names_what_was_awaited": "closures",
    "test_io.py::test_an_open_connection_does_not_hold_back_calls": "closures",
    "test_io_surface.py::test_sendfile": "closures",
    "test_io_threads.py::test_a_thread_started_as_another_ends_is_waited_for": "closures",
}

EnvFactory = Callable[..., Environment]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the "process" mode of the tests of NOT_IN_NEW_PROCESSES."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        key = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if callspec and callspec.params.get("mode") == "process" and key in NOT_IN_NEW_PROCESSES:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_env(mode: str, request: pytest.FixtureRequest) -> AsyncIterator[EnvFactory]:
    """Build test environments in the test's mode."""
    made: list[Environment] = []
    workers: WorkerPool | None = None
    if MODES[mode].get("replay") == "process":
        workers = request.getfixturevalue("dispatch_workers")

    def make(*functions: Function[Any, Any], **options: Any) -> Environment:
        settings = {**MODES[mode], **options}
        if settings.get("replay") == "process":
            settings["workers"] = workers
        env = Environment(functions, **settings)
        made.append(env)
        return env

    yield make
    for env in made:
        await env.aclose()
