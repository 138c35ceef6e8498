"""Run mypy on check_api.py: exactly the lines marked ``# E: <code>`` must fail."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

CHECKED = pathlib.Path(__file__).with_name("check_api.py")
ROOT = CHECKED.parents[2]
MARKER = re.compile(r"#\s*E:\s*([a-z-]+)\s*$")
ERROR = re.compile(
    r"^(?P<file>[^:]+):(?P<line>\d+): error: (?P<message>.*)  \[(?P<code>[a-z-]+)\]$"
)


def expected_errors() -> set[tuple[int, str]]:
    lines = CHECKED.read_text().splitlines()
    return {(n, m[1]) for n, line in enumerate(lines, 1) if (m := MARKER.search(line))}


def test_public_api_types(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(CHECKED),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    errors = [m for line in result.stdout.splitlines() if (m := ERROR.match(line))]
    unparsed = [
        line for line in result.stdout.splitlines() if ": error:" in line and not ERROR.match(line)
    ]
    assert not unparsed and not result.stderr, result.stdout + result.stderr
    found = {(int(m["line"]), m["code"]) for m in errors}
    expected = expected_errors()
    assert len(expected) >= 10
    assert found == expected, (
        f"unexpected errors: {sorted(found - expected)}\n"
        f"missing errors: {sorted(expected - found)}\n{result.stdout}"
    )
