"""pytest plugin of dispatch_aio: the ``dispatch_env`` fixture and replay-checking options.

Registered through the ``pytest11`` entry point, so it is active wherever
dispatch_aio is installed. ``dispatch_env`` is a factory of
`dispatch_aio.testing.Environment` objects, closed after the test::

    async def test_total(dispatch_env):
        env = dispatch_env(dispatch)
        assert await env.call(total, 10) == 90

Replay checking for a whole session: ``pytest --dispatch-replay=always
--dispatch-shuffle``; for one test: ``@pytest.mark.dispatch(replay="always",
shuffle=True, split=True)``. Options given to the factory win over both.

``pytest --dispatch-replay=process`` runs every Run request of every call in a
new Python process, as a scheduler that restarts the app before every
resume would: values and errors then cross a process boundary at each round.
The session's environments share the spare workers of one
`dispatch_aio.testing.WorkerPool`, the ``dispatch_workers`` fixture, which
tests can also pass to environments they make themselves::

    async def test_total(dispatch_workers):
        async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
            assert await env.call(total, 10) == 90
"""

from __future__ import annotations

__all__ = ["dispatch_workers", "pytest_addoption", "pytest_configure"]

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .testing import Environment, WorkerPool


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the session-wide replay-checking options."""
    group = parser.getgroup("dispatch_aio", "dispatch_aio durable functions")
    group.addoption(
        "--dispatch-replay",
        choices=("cached", "always", "process"),
        default=None,
        help="replay durable functions from their journal at every round ('always'), "
        "in a new Python process at every round ('process'), "
        "or keep suspended runs live ('cached', the default)",
    )
    group.addoption(
        "--dispatch-shuffle",
        action="store_true",
        default=False,
        help="deliver results of concurrent durable calls in random order, over several rounds",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``dispatch`` marker."""
    config.addinivalue_line(
        "markers",
        "dispatch(**options): options of dispatch_aio.testing.Environment for the "
        "dispatch_env fixture of this test (replay=, shuffle=, split=, seed=, ...)",
    )


def _defaults(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    replay = request.config.getoption("--dispatch-replay")
    if replay is not None:
        options["replay"] = replay
    if request.config.getoption("--dispatch-shuffle"):
        options.update(shuffle=True, split=True)
    marker = request.node.get_closest_marker("dispatch")
    if marker is not None:
        options.update(marker.kwargs)
    return options


@pytest.fixture(scope="session")
def dispatch_workers() -> Iterator[WorkerPool]:
    """Return the session's pool of workers for environments with ``replay="process"``."""
    from .testing import WorkerPool

    with WorkerPool(preload=["pytest"]) as pool:  # test modules import it
        yield pool


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio

    @pytest.fixture(name="dispatch_env")
    def _dispatch_env_unavailable() -> None:
        """Unavailable: install pytest-asyncio to use it."""
        pytest.fail("the dispatch_env fixture needs pytest-asyncio: pip install pytest-asyncio")

else:

    @pytest_asyncio.fixture(name="dispatch_env")
    async def _dispatch_env(
        request: pytest.FixtureRequest,
    ) -> AsyncIterator[Callable[..., Environment]]:
        """Return a factory of test environments; they are closed after the test."""
        from .testing import Environment

        defaults = _defaults(request)
        made: list[Environment] = []

        def make(target: Any, **options: Any) -> Environment:
            options = {**defaults, **options}
            if options.get("replay") == "process" and options.get("workers") is None:
                options["workers"] = request.getfixturevalue("dispatch_workers")
            env = Environment(target, **options)
            made.append(env)
            return env

        yield make
        for env in made:
            await env.aclose()
