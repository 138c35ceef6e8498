"""``dispatch-aio server``/``run`` with ``--database``: PostgreSQL instead of the data folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON, READY_LINE, Starter

from dispatch_aio.cli import main

PRINT_OK = [PYTHON, "-c", "print('ok')"]


def test_database_and_in_memory_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--in-memory", "--database", "postgresql://u@h/db"]) == 2
    assert "--database and --in-memory cannot go together" in capsys.readouterr().err


def test_a_database_that_is_no_postgresql_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["server", "--database", "mysql://u:pw@h/db"]) == 2
    err = capsys.readouterr().err
    assert "invalid --database: 'mysql://u:***@h/db' is not a PostgreSQL URL" in err
    assert "pw" not in err


def test_an_unreachable_database_is_named_with_its_password_masked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = "postgresql://alice:s3cret@127.0.0.1:1/calls"
    assert main(["server", "--port", "0", "--data-dir", str(tmp_path), "--database", url]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to the database postgresql://alice:***@127.0.0.1:1/calls" in err
    assert "s3cret" not in err


async def test_server_on_postgresql_from_the_environment(
    procs: Starter, pg_url: str, tmp_path: Path
) -> None:
    env = dict(os.environ, DISPATCH_DATABASE_URL=pg_url)
    first = procs([*CLI, "server", "--port", "0", "--data-dir", str(tmp_path)], env=env)
    first.wait_for(re.escape(READY_LINE))
    assert f"Database:  {pg_url}" in first.out
    # The connection file is still published, for `calls` and `show`.
    assert (tmp_path / "scheduler.json").exists()
    assert not (tmp_path / "scheduler.db").exists()
    # A second scheduler on the same database runs as a replica of the first: same
    # API key and signing key, kept in the database.
    second = procs([*CLI, "server", "--port", "0", "--data-dir", str(tmp_path / "other")], env=env)
    second.wait_for(re.escape(READY_LINE))
    for name in ("DISPATCH_API_KEY", "DISPATCH_VERIFICATION_KEY"):
        (line,) = [line for line in first.out if line.startswith(f"export {name}=")]
        assert line in second.out
    # --in-memory wins over the variable.
    memory = procs([*CLI, "server", "--port", "0", "--in-memory"], env=env)
    memory.wait_for(re.escape(READY_LINE))
    assert "Database:  memory only (--in-memory)" in memory.out


def test_run_keeps_the_calls_in_postgresql(procs: Starter, pg_url: str, tmp_path: Path) -> None:
    password_url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:pw@")
    app = procs(
        [*CLI, "run", "--data-dir", str(tmp_path), "--database", password_url, "--", *PRINT_OK],
        env=dict(os.environ, NO_COLOR="1"),
    )
    assert app.wait(30) == 0, app.dump()
    masked = pg_url.replace("postgresql://postgres@", "postgresql://postgres:***@")
    assert f"calls kept in {masked}" in app.stdout
    assert "pw@" not in app.stdout + app.stderr
