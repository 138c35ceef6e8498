"""``dispatch-aio server``, and ``calls``/``show`` against it (real processes)."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON, READY_LINE, Server, Starter, start_server, wait_for_port
from ports import free_port

from dispatch_aio.cli import main

from .apps import EXAMPLE_APP, write_app


@pytest.fixture
def server(procs: Starter, tmp_path: Path) -> Server:
    """A server on a free port, and the example app run once against it."""
    port = free_port()
    server = start_server(
        procs,
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--endpoint",
        f"127.0.0.1:{port}",
    )
    app = procs([PYTHON, str(write_app(tmp_path, EXAMPLE_APP))], env=server.app_env())
    assert app.wait(60) == 0, app.dump()
    return server


def inspect(
    capsys: pytest.CaptureFixture[str], server: Server | None, *argv: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    api = ["--api-url", server.api_url, "--api-key", server.api_key] if server else []
    status = main([*argv, *api])
    out, err = capsys.readouterr()
    return status, out, err


def test_server_prints_the_variables_to_export_then_the_ready_line(
    procs: Starter, tmp_path: Path
) -> None:
    server = start_server(procs, "--port", "0", "--data-dir", str(tmp_path / "data"))
    out = server.proc.out
    assert out[0].startswith("dispatch-aio ")
    assert out[-1] == READY_LINE
    assert set(server.exports) == {
        "DISPATCH_API_URL",
        "DISPATCH_API_KEY",
        "DISPATCH_ENDPOINT_URL",
        "DISPATCH_ENDPOINT_ADDR",
        "DISPATCH_VERIFICATION_KEY",
    }
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.api_url)
    assert server.exports["DISPATCH_ENDPOINT_URL"] == "http://127.0.0.1:8000"
    assert server.exports["DISPATCH_ENDPOINT_ADDR"] == "127.0.0.1:8000"
    assert f"Database:  {tmp_path / 'data' / 'scheduler.db'}" in out
    # The API answers with the printed key.
    wait_for_port(int(server.api_url.rpartition(":")[2]))
    # SIGINT stops it cleanly; the verification key and the API key survive a restart
    # (both are in the database), so the exported variables stay right.
    server.proc.send(signal.SIGINT)
    assert server.proc.wait(10) == 0, server.proc.dump()
    again = start_server(procs, "--port", "0", "--data-dir", str(tmp_path / "data"))
    key = "DISPATCH_VERIFICATION_KEY"
    assert again.exports[key] == server.exports[key]
    assert again.api_key == server.api_key


def test_server_refuses_a_port_in_use(procs: Starter) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = procs([*CLI, "server", "--in-memory", "--port", str(port)])
        assert proc.wait(30) == 1
    assert f"cannot serve the scheduler API on 127.0.0.1:{port}: the port is in use" in proc.stderr


def test_server_shows_finished_top_level_calls(server: Server) -> None:
    server.proc.wait_for(r"^done   total\(10\) -> 90  \(")
    server.proc.wait_for(r"^failed reject\(3\): PermanentError: cannot take 3  \(permanent_error")
    assert not any("double" in line for line in server.proc.out)  # children: no lines


def test_calls_lists_top_level_calls(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = inspect(capsys, server, "calls")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "FUNCTION",
        "STATE",
        "ATTEMPTS",
        "CHILDREN",
        "CREATED",
        "DURATION",
    ]
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        ("total", "ok", "1", "10"),
        ("reject", "permanent_error", "1", "0"),
    ]
    assert all(re.fullmatch(r"[0-9a-f]{32}", r[0]) for r in rows)


def test_calls_filters(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    def listed(*argv: str) -> list[dict[str, object]]:
        status, out, _ = inspect(capsys, server, "calls", "--json", *argv)
        assert status == 0
        calls: list[dict[str, object]] = json.loads(out)["calls"]  # one document
        return calls

    everything = listed("--all", "--limit", "0")
    assert sorted(c["function"] for c in everything) == sorted(
        ["total", "reject", *["double"] * 10]
    )
    assert [c["function"] for c in listed("--status", "failed")] == ["reject"]
    # Filters look at calls made by functions too.
    assert sorted(c["function"] for c in listed("--status", "ok")) == ["double"] * 10 + ["total"]
    assert [c["function"] for c in listed("--state", "failed")] == ["reject"]
    assert listed("--state", "pending") == []
    root = next(c for c in everything if c["function"] == "total")
    tree = listed("--root", str(root["dispatch_id"]))
    assert len(tree) == 11
    assert all("input" not in c for c in tree)  # the list leaves payloads out
    # --limit keeps the most recent calls, and says so.
    status, out, err = inspect(capsys, server, "calls", "--all", "--limit", "3")
    assert status == 0
    assert len(out.splitlines()) == 4
    assert "the last 3 of 12 calls" in err


def test_show_prints_the_call_tree(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = inspect(capsys, server, "calls", "--json", "--status", "ok")
    (root,) = {c["root_dispatch_id"] for c in json.loads(out)["calls"]}
    status, out, _ = inspect(capsys, server, "show", root)
    assert status == 0
    lines = out.splitlines()
    assert re.fullmatch(rf"total  ok  \(1 attempt, \d+ polls?, [0-9.]+m?s\)  {root}", lines[0])
    assert lines[1:3] == ["\u2502  input:  (10)", "\u2502  output: 90"]
    children = [line for line in lines if re.match(r"^[\u251c\u2514]\u2500 double  ok", line)]
    assert len(children) == 10
    outputs = sorted(int(line.rpartition(" ")[2]) for line in lines if "output: " in line)
    assert outputs == sorted([90, *(2 * i for i in range(10))])
    # --json gives the whole tree, its calls nested, named as the table names them.
    _, out, _ = inspect(capsys, server, "show", root, "--json")
    doc = json.loads(out)
    assert (doc["state"], doc["status"], doc["attempts"], doc["output"]) == ("ok", "ok", 1, "90")
    assert len(doc["calls"]) == 10
    assert [r["outcome"] for r in doc["request_log"]][-1] == "ok"


def test_show_prints_the_error_and_its_traceback(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = inspect(capsys, server, "calls", "--json", "--status", "failed")
    (failed,) = [c["dispatch_id"] for c in json.loads(out)["calls"]]
    status, out, _ = inspect(capsys, server, "show", failed)
    assert status == 0
    assert out.splitlines()[0].startswith("reject  permanent_error  (1 attempt, ")
    assert "error:  PermanentError: cannot take 3" in out
    assert "Traceback (most recent call last):" in out
    assert 'raise errors.PermanentError(f"cannot take {x}")' in out


def test_inspection_errors_say_what_to_do(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, err = inspect(capsys, server, "show", "0" * 32)
    assert status == 1, err
    assert f"no call with dispatch id {'0' * 32!r}" in err
    status, _, err = inspect(
        capsys, None, "calls", "--api-url", server.api_url, "--api-key", "wrong"
    )
    assert status == 1
    assert "rejected the API key" in err
    status, _, err = inspect(
        capsys, None, "calls", "--api-url", f"http://127.0.0.1:{free_port()}", "--api-key", "k"
    )
    assert status == 1
    assert "cannot reach the scheduler" in err
    monkeypatch.delenv("DISPATCH_API_URL", raising=False)
    monkeypatch.delenv("DISPATCH_API_KEY", raising=False)
    status, _, err = inspect(capsys, None, "calls", "--data-dir", "/nonexistent-5f1c")
    assert status == 2
    assert "no scheduler to inspect" in err


def test_calls_finds_a_running_scheduler_from_its_data_folder(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DISPATCH_API_URL", raising=False)
    monkeypatch.delenv("DISPATCH_API_KEY", raising=False)
    status, out, _ = inspect(capsys, None, "calls", "--data-dir", str(tmp_path / "data"))
    assert status == 0
    assert "total" in out
    # The variables win over the folder.
    monkeypatch.setenv("DISPATCH_API_URL", server.api_url)
    monkeypatch.setenv("DISPATCH_API_KEY", "wrong")
    status, _, err = inspect(capsys, None, "calls", "--data-dir", str(tmp_path / "data"))
    assert status == 1
    assert "rejected the API key" in err


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "server", "calls", "show", "version"):
        assert command in out
    assert main(["calls", "--state", "sleeping"]) == 2
    assert "invalid choice: 'sleeping'" in capsys.readouterr().err
