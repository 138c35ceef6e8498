"""``dispatch-aio run``: a real scheduler and a real application, as subprocesses."""

from __future__ import annotations

import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e.harness import CLI, PYTHON, Starter, start_server
from ports import free_port

from dispatch_aio.cli import main

from .apps import EXAMPLE_APP, SLEEPER_APP, write_app


def run_args(tmp_path: Path, *options: str) -> list[str]:
    return [
        *CLI,
        "run",
        "--data-dir",
        str(tmp_path / "data"),
        "--endpoint",
        "127.0.0.1:0",
        *options,
    ]


def test_run_prefixes_output_shows_finished_calls_and_exits_with_the_app_status(
    procs: Starter, tmp_path: Path
) -> None:
    app = write_app(tmp_path, EXAMPLE_APP)
    proc = procs([*run_args(tmp_path), "--", PYTHON, str(app), "3"], cwd=tmp_path)
    assert proc.wait(60) == 3, proc.dump()
    out, err = proc.out, proc.err

    # The application's lines carry its name, padded like ours.
    assert "app      | serving" in out
    assert "app      | all results in" in err
    variables = "DISPATCH_API_URL DISPATCH_API_KEY DISPATCH_ENDPOINT_URL DISPATCH_ENDPOINT_ADDR "
    assert f"app      | variables: {variables}DISPATCH_VERIFICATION_KEY" in out
    # A line per finished top-level call: function, input, result or error, timing, attempts.
    done = [line for line in out if line.startswith("dispatch | done")]
    assert len(done) == 1, proc.dump()
    assert re.fullmatch(
        r"dispatch \| done   total\(10\) -> 90  \([0-9.]+m?s, 1 attempt\)  [0-9a-f]{32}", done[0]
    )
    failed = [line for line in out if line.startswith("dispatch | failed")]
    assert len(failed) == 1, proc.dump()
    assert re.fullmatch(
        r"dispatch \| failed reject\(3\): PermanentError: cannot take 3  "
        r"\(permanent_error, [0-9.]+m?s, 1 attempt\)  [0-9a-f]{32}",
        failed[0],
    )
    assert any(re.search(r"app\.py 3 exited with status 3$", line) for line in out)
    assert "dispatch | calls: 11 done, 1 failed" in out
    # Not a terminal: no colours, no status line.
    assert "\x1b" not in proc.stdout + proc.stderr
    # The database is in the data folder, which git is told to ignore.
    assert (tmp_path / "data" / "scheduler.db").is_file()
    assert (tmp_path / "data" / ".gitignore").read_text().strip().endswith("*")
    assert not (tmp_path / "data" / "scheduler.json").exists()  # removed at exit


def test_run_keeps_its_api_key_with_its_data_unless_one_is_given(
    procs: Starter, tmp_path: Path
) -> None:
    app = write_app(tmp_path, EXAMPLE_APP)
    keys = []
    for options in ([], [], ["--in-memory"], ["--api-key", "my-key", "--in-memory"]):
        proc = procs([*run_args(tmp_path, *options), "--", PYTHON, str(app)], cwd=tmp_path)
        assert proc.wait(60) == 0, proc.dump()
        keys.append(proc.wait_for("api key:").rpartition(" ")[2])
    assert keys[0] == keys[1]  # kept in the database, made on first use
    assert len(keys[0]) >= 24
    assert keys[2] != keys[0] and len(keys[2]) >= 24  # nothing kept: a new one
    assert keys[3] == "my-key"


def test_in_memory_keeps_nothing_on_disk(procs: Starter, tmp_path: Path) -> None:
    app = write_app(tmp_path, EXAMPLE_APP)
    proc = procs(
        [*CLI, "run", "--in-memory", "--endpoint", "127.0.0.1:0", "--", PYTHON, str(app)],
        cwd=tmp_path,
    )
    assert proc.wait(60) == 0, proc.dump()
    assert "calls kept in memory only (--in-memory)" in proc.stdout
    assert not (tmp_path / ".dispatch").exists()


def test_the_data_folder_defaults_to_dot_dispatch(procs: Starter, tmp_path: Path) -> None:
    proc = procs(
        [*CLI, "run", "--endpoint", "127.0.0.1:0", "--", PYTHON, "-c", "pass"], cwd=tmp_path
    )
    assert proc.wait(30) == 0, proc.dump()
    assert (tmp_path / ".dispatch" / "scheduler.db").is_file()
    assert "calls kept in .dispatch/scheduler.db" in proc.stdout


def test_unfinished_calls_are_picked_up_by_the_next_run(procs: Starter, tmp_path: Path) -> None:
    # The application exits while its call sleeps durably; the next run finishes it.
    app = write_app(tmp_path, EXAMPLE_APP)
    options = ["--data-dir", str(tmp_path / "data"), "--endpoint", f"127.0.0.1:{free_port()}"]
    command = [*CLI, "run", *options, "--", PYTHON, str(app)]
    first = procs(command, cwd=tmp_path, env=env(APP_PAUSE="2", APP_MODE="submit"))
    assert first.wait(60) == 0, first.dump()
    assert not any("done   total" in line for line in first.out)
    assert re.search(
        r"unfinished \(kept in .*scheduler\.db: they resume at the next start\)", first.stdout
    )

    second = procs(command, cwd=tmp_path, env=env(APP_MODE="serve"))
    second.wait_for(r"^dispatch \| done   total\(10\) -> 90", timeout=30)
    second.send(signal.SIGINT)
    assert second.wait(10) == 0, second.dump()  # dispatch.run() stops cleanly on SIGINT


def env(**extra: str) -> dict[str, str]:
    values = dict(os.environ)
    values.update(extra)
    return values


# -- signals ------------------------------------------------------------------------------


def test_a_signal_is_passed_on_to_the_app_and_its_status_returned(
    procs: Starter, tmp_path: Path
) -> None:
    app = write_app(tmp_path, SLEEPER_APP)
    proc = procs([*run_args(tmp_path), "--", PYTHON, str(app)], cwd=tmp_path)
    proc.wait_for("app +\\| ready")
    start = time.monotonic()
    proc.send(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM, proc.dump()
    assert time.monotonic() - start < 5
    assert (
        "dispatch | SIGTERM received: passing it on to the application (again to kill it)"
        in proc.out
    )
    assert any("was ended by SIGTERM (exit status 143)" in line for line in proc.out)


def test_a_second_signal_kills_an_app_that_ignores_the_first(
    procs: Starter, tmp_path: Path
) -> None:
    app = write_app(tmp_path, SLEEPER_APP)
    proc = procs([*run_args(tmp_path), "--", PYTHON, str(app), "ignore"], cwd=tmp_path)
    proc.wait_for("app +\\| ready")
    proc.send(signal.SIGINT)
    proc.wait_for("SIGINT received: passing it on")
    time.sleep(0.3)
    assert proc.poll() is None  # the application ignored it
    proc.send(signal.SIGINT)
    assert proc.wait(10) == 128 + signal.SIGKILL, proc.dump()
    assert "dispatch | SIGINT received again: killing the application" in proc.out


def test_a_signal_delivered_twice_at_once_is_one_request(procs: Starter, tmp_path: Path) -> None:
    # GNU timeout, for one, signals the process and then its group.
    app = write_app(tmp_path, SLEEPER_APP)
    proc = procs([*run_args(tmp_path), "--", PYTHON, str(app)], cwd=tmp_path)
    proc.wait_for("app +\\| ready")
    proc.send(signal.SIGTERM)
    proc.send(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM, proc.dump()
    assert not any("received again" in line for line in proc.out), proc.dump()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses PR_SET_PDEATHSIG")
def test_the_app_ends_when_run_is_killed(procs: Starter, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    app = write_app(
        tmp_path,
        f"import os, pathlib\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        + SLEEPER_APP,
    )
    proc = procs([*run_args(tmp_path), "--", PYTHON, str(app)], cwd=tmp_path)
    proc.wait_for("app +\\| ready")
    app_pid = int(pid_file.read_text())
    proc.send(signal.SIGKILL)  # no chance to pass anything on
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(app_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(app_pid, signal.SIGKILL)
    raise AssertionError("the application outlived dispatch-aio run")


# -- a terminal -----------------------------------------------------------------------------


def run_in_terminal(tmp_path: Path, extra_env: dict[str, str]) -> tuple[int, str]:
    """Run the example app with stdout on a pseudo-terminal; return status and output."""
    app = write_app(tmp_path, EXAMPLE_APP)
    master, slave = pty.openpty()
    proc = None
    try:
        import subprocess

        proc = subprocess.Popen(
            [*run_args(tmp_path), "--", PYTHON, str(app)],
            cwd=tmp_path,
            env=env(APP_PAUSE="1.2", TERM="xterm", COLUMNS="200", **extra_env),
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
        return proc.wait(30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_on_a_terminal_a_status_line_is_redrawn_in_place_with_colours(tmp_path: Path) -> None:
    status, output = run_in_terminal(tmp_path, {"NO_COLOR": ""})
    assert status == 0, output
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    # The status line counts calls by state; it is erased before each new line.
    assert re.search(r"\d+ pending, \d+ running, \d+ suspended, \d+ done, \d+ failed", plain)
    assert "1 suspended" in plain  # total() sleeps durably for 1.2 s
    assert "\r\x1b[K" in output
    assert "\x1b[32m" in output  # green "done"
    assert re.search(r"done\s+total\(10\) -> 90", plain)


def test_no_color_turns_colours_off_but_keeps_the_status_line(tmp_path: Path) -> None:
    status, output = run_in_terminal(tmp_path, {"NO_COLOR": "1"})
    assert status == 0, output
    assert not re.search(r"\x1b\[[0-9;]*m", output)
    assert "\r\x1b[K" in output
    assert re.search(r"\d+ pending, \d+ running, \d+ suspended", output)


# -- mistakes -------------------------------------------------------------------------------


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run"], ["run", "--"], ["run", "--in-memory", "--"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "dispatch-aio run: error: no command to run" in err
        assert "dispatch-aio run -- python app.py" in err


def test_a_command_that_is_not_found_exits_127(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--in-memory", "--", "no-such-program-5f1c"]) == 127
    err = capsys.readouterr().err
    assert "command not found: 'no-such-program-5f1c'" in err
    assert "PATH" in err


def test_a_file_that_is_not_executable_exits_126(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_app(tmp_path, "print('hi')\n", "script.py")
    assert main(["run", "--in-memory", "--", str(script)]) == 126
    assert "is not an executable file" in capsys.readouterr().err
    assert main(["run", "--in-memory", "--", str(tmp_path / "missing.py")]) == 127
    assert "no such file" in capsys.readouterr().err


def test_run_refuses_an_endpoint_address_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        argv = ["run", "--in-memory", "--endpoint", f"127.0.0.1:{port}", "--", PYTHON, "-c", "1"]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"something already listens on 127.0.0.1:{port}" in err
    assert "--endpoint HOST:PORT" in err


def test_run_refuses_an_api_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        argv = ["run", "--in-memory", "--port", str(port), "--endpoint", "127.0.0.1:0", "--"]
        assert main([*argv, PYTHON, "-c", "1"]) == 1
    err = capsys.readouterr().err
    assert f"cannot serve the scheduler API on 127.0.0.1:{port}: the port is in use" in err
    assert "--port" in err


def test_invalid_addresses_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for endpoint in ("8000", "http://127.0.0.1:8000", "[nope]:80", "127.0.0.1:70000"):
        assert main(["run", "--in-memory", "--endpoint", endpoint, "--", PYTHON]) == 2
        assert f"invalid --endpoint {endpoint!r}" in capsys.readouterr().err


def test_run_refuses_a_database_locked_by_another_scheduler(
    procs: Starter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "data")
    start_server(procs, "--port", "0", "--data-dir", data)
    argv = ["run", "--data-dir", data, "--endpoint", "127.0.0.1:0", "--", PYTHON, "-c", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is in use by another process" in err
    assert "--data-dir PATH" in err
    assert "--in-memory" in err
    # Another server on the same folder is refused the same way.
    second = procs([*CLI, "server", "--port", "0", "--data-dir", data])
    assert second.wait(30) == 1
    assert "is in use by another process" in second.stderr


def test_python_dash_m_and_the_console_script_run_the_command(procs: Starter) -> None:
    proc = procs([*CLI, "version"])
    assert proc.wait() == 0
    assert re.fullmatch(r"dispatch-aio \d+\.\d+\.\d+\S* \(Python \d+\.\d+\.\d+\)", proc.stdout)
    script = Path(sys.executable).parent / "dispatch-aio"
    assert script.exists()
    proc = procs([str(script), "--version"])
    assert proc.wait() == 0
    assert proc.stdout.startswith("dispatch-aio ")


def test_an_app_run_with_another_python_gets_a_hint(procs: Starter, tmp_path: Path) -> None:
    other = str(Path(sys.base_prefix) / "bin" / "python3")
    if not Path(other).exists():
        pytest.skip(f"no {other} here")
    probe = subprocess.run([other, "-c", "import dispatch_aio"], capture_output=True, timeout=60)
    if probe.returncode == 0:
        pytest.skip(f"{other} has dispatch_aio installed: no Python without it here")
    app = write_app(tmp_path, EXAMPLE_APP)
    proc = procs([*run_args(tmp_path, "--in-memory"), "--", other, str(app)], cwd=tmp_path)
    assert proc.wait(60) == 1, proc.dump()
    assert "ModuleNotFoundError" in proc.stderr
    assert f"hint: {other!r} cannot import" in proc.stderr
    assert "is it the Python dispatch-aio is installed in?" in proc.stderr
    assert f"dispatch-aio run -- {sys.executable} {app}" in proc.stderr
