from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dispatch_aio._function import Function

from .driver import MODES, Driver

DriverFactory = Callable[..., Driver]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_driver(mode: str) -> AsyncIterator[DriverFactory]:
    """Build drivers in the test's mode (live cache, forced replay, shuffled delivery)."""
    drivers: list[Driver] = []

    def make(*functions: Function[Any, Any], **kwargs: Any) -> Driver:
        driver = Driver(list(functions), mode, **kwargs)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()
