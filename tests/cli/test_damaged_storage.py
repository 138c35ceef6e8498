"""A damaged or unreachable database stops the scheduler with one line that says what to do."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON
from scheduler.test_sqlite_integrity import damage_pages, filled

APP = textwrap.dedent(
    """
    from dispatch_aio import Dispatch

    dispatch = Dispatch()


    @dispatch.function
    async def double(x: int) -> int:
        return 2 * x


    if __name__ == "__main__":
        dispatch.run()
    """
)


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    environ.update(env)
    return subprocess.run(
        args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=60, check=False
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line the process printed before it exited with status 1."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
async def damaged(tmp_path: Path) -> Path:
    """A data folder whose database has damaged pages."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = await filled(data / "scheduler.db", 300)
    await store.close()
    damage_pages(data / "scheduler.db")
    return data


@pytest.mark.parametrize("how", ["server", "run", "app alone"])
def test_a_damaged_database_is_one_line_that_says_what_to_do(
    damaged: Path, tmp_path: Path, how: str
) -> None:
    (tmp_path / "app.py").write_text(APP)
    if how == "server":
        proc = run([*CLI, "server", "--data-dir", str(damaged), "--port", "0"], tmp_path)
    elif how == "run":
        args = [*CLI, "run", "--data-dir", str(damaged), "--endpoint", "127.0.0.1:0"]
        args += ["--", PYTHON, "app.py"]
        proc = run(args, tmp_path)
    else:
        env = {"DISPATCH_DATA_DIR": str(damaged), "DISPATCH_ENDPOINT_ADDR": "127.0.0.1:0"}
        proc = run([PYTHON, "app.py"], tmp_path, **env)
    line = one_line_error(proc)
    assert f"the database {str(damaged / 'scheduler.db')!r} is damaged" in line, line
    assert "restore it from a backup" in line, line
    # Nothing about using another folder: that is the advice for a folder in use.
    assert "another folder" not in line, line


def test_an_unreachable_postgresql_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://dispatch@127.0.0.1:9/dispatch"
    proc = run([*CLI, "server", "--database", url, "--port", "0"], tmp_path)
    line = one_line_error(proc)
    assert "cannot connect to the database postgresql://dispatch@127.0.0.1:9/dispatch" in line
    assert "check the URL, and that PostgreSQL runs there" in line, line
