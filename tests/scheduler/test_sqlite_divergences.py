"""Schema version 3 of the SQLite store: divergences counted per call."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dispatch_aio.scheduler.store import CallRecord, InsertCall, Phase, UpdateCall
from dispatch_aio.scheduler.store._sqlite import _MIGRATIONS, SCHEMA_VERSION, SQLiteStore


async def test_a_version_2_database_gains_the_divergence_count(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for migrate in _MIGRATIONS[:2]:
        migrate(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        rec = CallRecord(
            id="c1", root_id="c1", parent_id="", correlation_id=0, parent_generation=0,
            endpoint="http://x", function="f", input=b"", version="v1", created_at=1.0,
            expires_at=2.0, phase=Phase.PENDING, updated_at=1.0,
        )  # fmt: skip
        await store.write([InsertCall(rec)])
        await store.write([UpdateCall(rec._replace(divergences=2, version="v2"))])
        (loaded,) = (await store.load()).calls
        assert (loaded.divergences, loaded.version) == (2, "v2")
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
