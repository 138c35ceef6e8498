"""Fixtures for scheduler tests: a scripted endpoint on loopback, schedulers and stores."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio.scheduler import PostgresStore, Scheduler, SQLiteStore, Store

from .scripted import API_KEY, FAST_RETRY, RUN_PATH, ScriptedEndpoint


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def endpoint(signing_key: Ed25519PrivateKey) -> AsyncIterator[ScriptedEndpoint]:
    ep = ScriptedEndpoint(public_key=signing_key.public_key())
    app = web.Application()
    app.router.add_post(RUN_PATH, ep.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    ep.url = f"http://{host}:{port}"
    yield ep
    await runner.cleanup()
    assert not ep.signature_failures


@pytest.fixture
async def make_scheduler(
    signing_key: Ed25519PrivateKey,
) -> AsyncIterator[Callable[..., Awaitable[Scheduler]]]:
    started: list[Scheduler] = []

    async def make(store: str = ":memory:", **kwargs: Any) -> Scheduler:
        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("signing_key", signing_key)
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("rng", random.Random(1))
        scheduler = Scheduler(store, **kwargs)
        await scheduler.start()
        started.append(scheduler)
        return scheduler

    yield make
    for scheduler in reversed(started):
        await scheduler.close()


STORE_KINDS = ["sqlite", "postgres"]


@pytest.fixture(params=STORE_KINDS)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Make unopened stores of one database, on each kind of store in turn.

    Each store made is a new client of the same database, as a restarted scheduler is.
    """
    if request.param == "sqlite":
        path = str(tmp_path / "calls.db")
        return lambda: SQLiteStore(path)
    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


@pytest.fixture
async def store(new_store: Callable[[], Store]) -> AsyncIterator[Store]:
    """An open store, on each kind of store in turn."""
    s = new_store()
    await s.open()
    yield s
    await s.close()
