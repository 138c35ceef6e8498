"""``dispatch-aio server``/``run`` with ``--database``: PostgreSQL instead of the data folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON, READY_LINE, Starter

from dispatch_aio.cli import main

PRINT_OK = [PYTHON, "-c", "print('ok')"]
# Not the default 127.0.0.1:8000, which another test (or program) may hold.
ANY_PORT = ["--endpoint", "127.0.0.1:0"]


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
    options = ["--data-dir", str(tmp_path), "--database", password_url, *ANY_PORT]
    app = procs([*CLI, "run", *options, "--", *PRINT_OK], env=dict(os.environ, NO_COLOR="1"))
    assert app.wait(30) == 0, app.dump()
    masked = pg_url.replace("postgresql://postgres@", "postgresql://postgres:***@")
    assert f"calls kept in {masked}" in app.stdout
    assert "pw@" not in app.stdout + app.stderr


APP = """
import asyncio
from dispatch_aio import Dispatch

dispatch = Dispatch()


@dispatch.function
async def double(x: int) -> int:
    return 2 * x


async def main() -> None:
    async with dispatch:
        await dispatch.start()
        dispatch_id = await double.dispatch(21)
        print("result", dispatch_id, await dispatch.client.result(dispatch_id, timeout=30))


asyncio.run(main())
"""


def test_calls_and_show_read_postgresql_when_no_scheduler_runs(
    procs: Starter, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "app.py").write_text(APP)
    options = ["--data-dir", str(tmp_path), "--database", pg_url, *ANY_PORT]
    app = procs(
        [*CLI, "run", *options, "--", PYTHON, "app.py"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")},
    )
    assert app.wait(60) == 0, app.dump()
    # The app's lines come prefixed with its name ("app      | result ID 42").
    found = [m for line in app.out if (m := re.search(r"\| result (\S+) 42$", line))]
    assert len(found) == 1, app.dump()
    dispatch_id = found[0][1]
    capsys.readouterr()
    assert main(["calls", "--database", pg_url, "--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "not through a scheduler" in err and "double" in out and dispatch_id in out, out
    assert main(["show", dispatch_id[-8:], "--database", pg_url]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("double  ok") and "output: 42" in out, out
