"""The SQLite store keeps its files private and refuses a damaged or rolled-back database."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from dispatch_aio.scheduler import SQLiteStore, StoreError
from dispatch_aio.scheduler.store import InsertCall, SetMeta

from .test_sqlite import record

NOBODY = 65534
SUFFIXES = ("", "-wal", "-shm", ".mark")


async def filled(path: Path, calls: int = 20) -> SQLiteStore:
    """An open store at `path` whose last `calls` writes are still in its WAL."""
    store = SQLiteStore(str(path))
    await store.open()
    await store.write([SetMeta("signing_key", b"secret key")])
    for i in range(calls):
        await store.write([InsertCall(record(f"call-{i}"))])
    return store


def snapshot(source: Path, target: Path, *, skip: str | None = None) -> None:
    """Copy the store's files as a crash would leave them (the store is still open)."""
    for suffix in SUFFIXES:
        if suffix != skip and Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")


def truncate_to_half(path: str | Path) -> None:
    os.truncate(path, os.stat(path).st_size // 2)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def present_files(db: Path) -> list[str]:
    return [f"{db}{s}" for s in SUFFIXES if os.path.exists(f"{db}{s}")]


def readable_by_nobody(path: str) -> bool:
    done = subprocess.run(["cat", path], user=NOBODY, capture_output=True, check=False)
    return done.returncode == 0


async def test_files_are_owner_only_even_when_they_were_not(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    store = await filled(db, 1)
    await store.close()
    for suffix in ("", ".mark"):
        assert mode(f"{db}{suffix}") == 0o600
        os.chmod(f"{db}{suffix}", 0o644)
    store = SQLiteStore(str(db))
    await store.open()
    try:
        await store.write([InsertCall(record("more"))])
        present = present_files(db)
        assert f"{db}-wal" in present
        assert {p: mode(p) for p in present} == dict.fromkeys(present, 0o600)
        if os.geteuid() == 0:  # another user cannot read the signing key
            os.chmod(tmp_path, 0o755)
            assert not any(readable_by_nobody(path) for path in present)
    finally:
        await store.close()


async def test_a_crash_copy_with_its_wal_opens_with_everything(tmp_path: Path) -> None:
    # The control case: the test's crash copy is faithful.
    store = await filled(tmp_path / "live.db")
    snapshot(tmp_path / "live.db", tmp_path / "copy.db")
    await store.close()
    copy = SQLiteStore(str(tmp_path / "copy.db"))
    await copy.open()
    try:
        assert len((await copy.load()).calls) == 20
    finally:
        await copy.close()


@pytest.mark.parametrize("damage", ["deleted wal", "truncated wal", "emptied database"])
async def test_lost_committed_work_is_refused(tmp_path: Path, damage: str) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    store = await filled(live)
    snapshot(live, copy, skip="-wal" if damage == "deleted wal" else None)
    await store.close()
    if damage == "truncated wal":
        truncate_to_half(f"{copy}-wal")
    elif damage == "emptied database":
        os.truncate(copy, 0)
        os.unlink(f"{copy}-wal")
    damaged = SQLiteStore(str(copy))
    with pytest.raises(StoreError, match="lost committed work") as caught:
        await damaged.open()
    assert str(copy) in str(caught.value) and "transactions" in str(caught.value)


async def test_a_truncated_database_is_reported_in_words(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    store = await filled(db, 300)
    await store.close()  # checkpointed into the database file
    truncate_to_half(db)
    with pytest.raises(StoreError, match="is damaged") as caught:
        await SQLiteStore(str(db)).open()
    assert "restore it from a backup" in str(caught.value)


def _read_only_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot write: a mode-0555 one, or for root a read-only mount."""
    if os.geteuid() != 0:
        folder = tmp_path / "data"
        folder.mkdir(mode=0o555)
        return folder
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            point, options = line.split()[1], line.split()[3].split(",")
            if "ro" in options and os.path.isdir(point) and not os.access(point, os.W_OK):
                return Path(point)
    return None


async def test_a_read_only_folder_is_reported_in_words(tmp_path: Path) -> None:
    folder = _read_only_folder(tmp_path)
    if folder is None:
        pytest.skip("root, and no read-only file system mounted to try")
    with pytest.raises(StoreError, match="is not writable by this user"):
        await SQLiteStore(str(folder / "scheduler.db")).open()


def damage_pages(path: Path) -> None:
    """Overwrite a few b-tree pages in the middle of the file with garbage."""
    with open(path, "r+b") as file:
        file.seek(4096 * 3)
        file.write(b"\xff" * 4096 * 3)


async def test_damaged_pages_are_reported_on_one_line(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    store = await filled(db, 300)
    await store.close()
    damage_pages(db)
    with pytest.raises(StoreError, match="is damaged") as caught:
        await SQLiteStore(str(db)).open()
    message = str(caught.value)
    assert "\n" not in message and str(db) in message, message
    assert "restore it from a backup" in message


async def test_a_full_disk_fails_the_write_in_words_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    store = await filled(db, 5)
    try:
        conn = store._conn
        assert conn is not None
        # SQLite answers SQLITE_FULL once the file would outgrow its page limit, as it
        # does when the disk is full.
        pages = store._locked(lambda: conn.execute("PRAGMA page_count").fetchone()[0])
        store._locked(conn.execute, f"PRAGMA max_page_count = {pages}")
        big = record("big")._replace(input=b"x" * 200_000)
        with pytest.raises(StoreError, match="its disk is full; free space there") as caught:
            await store.write([InsertCall(big)])
        assert str(db) in str(caught.value)
        assert await store.get_call("big") is None
        store._locked(conn.execute, "PRAGMA max_page_count = 1073741823")
        await store.write([InsertCall(big)])  # space again: the same write goes through
        assert await store.get_call("big") is not None
        assert len((await store.load()).calls) == 6
    finally:
        await store.close()
