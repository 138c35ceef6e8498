"""Fixtures of the interoperability tests with dispatch-py (see harness.py)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dispatch_aio.scheduler import Scheduler

from .harness import (
    API_KEY,
    FAST_RETRY,
    DispatchPyApp,
    Peer,
    StartPeer,
    VenvError,
    ensure_venv,
    peer_env,
    start_app,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def dispatch_py(request: pytest.FixtureRequest) -> Path:
    """The python of a virtualenv where dispatch-py is installed.

    Without access to the package registry the interop tests fail in CI (CI=true) and
    are skipped elsewhere, saying why.
    """
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("dispatch-py-venv") if cache is not None else None
    if base is None:  # the cache provider is disabled (-p no:cacheprovider)
        base = request.getfixturevalue("tmp_path_factory").mktemp("dispatch-py-venv")
    started = time.monotonic()
    try:
        python, created = ensure_venv(Path(base))
    except VenvError as exc:
        message = f"cannot set up dispatch-py for the interop tests: {exc}"
        if exc.offline and not _in_ci():
            pytest.skip(message + "\n(skipped outside CI; CI=true makes this a failure)")
        pytest.fail(message, pytrace=False)
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if created and reporter is not None and capture is not None:
        took = time.monotonic() - started
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\ndispatch-py virtualenv created in {took:.1f} s: {python.parents[1]}"
            )
    return python


@pytest.fixture
async def start_peer(dispatch_py: Path) -> AsyncIterator[StartPeer]:
    """Start a program of peers/ with dispatch-py; every one is killed when the test ends."""
    started: list[Peer] = []

    async def start(program: str, *args: str, ready: str | None = "ready", **env: str) -> Peer:
        peer = await Peer.start(dispatch_py, program, *args, env=peer_env(**env))
        started.append(peer)
        if ready is not None:
            await peer.line(ready)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            await peer.stop()


# -- our side -------------------------------------------------------------------------------


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    """Our local scheduler, serving its API on loopback."""
    async with Scheduler(":memory:", api_key=API_KEY, retry=FAST_RETRY) as scheduler:
        await scheduler.serve("127.0.0.1", 0)
        yield scheduler


@pytest.fixture
async def dispatch_py_app(start_peer: StartPeer, scheduler: Scheduler) -> DispatchPyApp:
    """peers/app.py, configured for our scheduler (whose signatures it verifies)."""
    return await start_app(start_peer, scheduler)
