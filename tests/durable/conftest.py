from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dispatch_aio._function import Function
from dispatch_aio.testing import Environment

# Every durable test runs with the live cache, with forced replay at each
# round, and with shuffled delivery split over several rounds.
MODES: dict[str, dict[str, Any]] = {
    "live": {},
    "replay": {"replay": "always"},
    "shuffle": {"shuffle": True, "split": True, "seed": 7},
}

EnvFactory = Callable[..., Environment]


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_env(mode: str) -> AsyncIterator[EnvFactory]:
    """Build test environments in the test's mode."""
    made: list[Environment] = []

    def make(*functions: Function[Any, Any], **options: Any) -> Environment:
        env = Environment(functions, **{**MODES[mode], **options})
        made.append(env)
        return env

    yield make
    for env in made:
        await env.aclose()
