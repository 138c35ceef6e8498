"""Options of the scheduler commands: checked paths, the exposure warning, --run-timeout."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest
from e2e.conftest import Stack
from e2e.harness import PYTHON, Starter, start_server, wait_for_port
from ports import free_port

from dispatch_aio.cli import main

from .apps import write_app


@pytest.mark.parametrize(
    ("path", "message"), [("", "--data-dir is empty"), ("a\nb", "holds control characters")]
)
def test_unusable_data_dirs_are_usage_errors(
    path: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["server", "--in-memory"], ["calls"]):
        assert main([*command, "--data-dir", path]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    [["--run-timeout", "0"], ["--max-attempts", "-1"], ["--idempotency-retention", "0"]],
)
def test_bad_numbers_are_usage_errors(
    option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "--in-memory", *option]) == 2
    assert option[0] in capsys.readouterr().err


def test_serving_beyond_loopback_prints_a_warning(procs: Starter) -> None:
    server = start_server(procs, "--in-memory", "--port", "0", "--host", "0.0.0.0")
    try:
        warning = server.proc.wait_for("warning: the scheduler API listens on 0.0.0.0", err=True)
        assert "every interface" in warning and "plain HTTP" in warning
    finally:
        server.proc.send(signal.SIGINT)
        server.proc.wait(10)
    quiet = start_server(procs, "--in-memory", "--port", "0")
    quiet.proc.send(signal.SIGINT)
    quiet.proc.wait(10)
    assert "warning" not in quiet.proc.stderr


SLOW_ONCE = textwrap.dedent(
    """
    import asyncio, os, time
    from pathlib import Path
    from dispatch_aio import Dispatch

    dispatch = Dispatch()
    MARK = Path(os.environ["SLOW_MARK"])

    @dispatch.function
    async def slow_once(x: int) -> int:
        if not MARK.exists():  # only the first attempt outlasts the run timeout
            MARK.touch()
            await asyncio.to_thread(time.sleep, 3)
        return x

    if __name__ == "__main__":
        dispatch.run()
    """
)


async def test_run_timeout_bounds_a_run_request(procs: Starter, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(
        procs, "--in-memory", "--port", "0", "--run-timeout", "1", "--endpoint",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    env = server.app_env(SLOW_MARK=str(tmp_path / "mark"))
    app = procs([PYTHON, str(write_app(tmp_path, SLOW_ONCE))], env=env)
    wait_for_port(port, proc=app)
    stack = Stack(server, app, f"http://127.0.0.1:{port}")
    info = await stack.wait(await stack.submit("slow_once", 7), max_wait=30)
    assert info.attempts >= 2, info  # the first was cut off after 1 s, not 300
