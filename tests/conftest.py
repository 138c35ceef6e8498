"""Fixtures shared by the test folders: a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pg_server import PgServer, running_pg_server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (started on first use)."""
    with running_pg_server() as server:
        yield server


@pytest.fixture
async def pg_url(pg_server: PgServer) -> str:
    """The URL of a new, empty PostgreSQL database."""
    return await pg_server.new_database()
