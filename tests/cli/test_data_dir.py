"""The scheduler's data folder is its owner's alone: it holds the signing key."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from e2e.harness import Starter, start_server


def test_the_data_folder_and_its_files_are_owner_only(procs: Starter, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # an existing folder with a looser mode is tightened too
    server = start_server(procs, "--port", "0", "--data-dir", str(data))
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        files = sorted(p.name for p in data.iterdir() if p.name.startswith("scheduler"))
        assert "scheduler.db" in files
        for name in files:
            assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600, name
    finally:
        server.proc.send(signal.SIGINT)
        assert server.proc.wait(10) == 0, server.proc.dump()
