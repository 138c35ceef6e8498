"""dispatch-aio check: replaying recorded journals against changed code."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest
from e2e.harness import PYTHON, Starter, start_server

from dispatch_aio import Call, Dispatch, cli
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.proto.v1.inspect_pb2 import CALL_STATE_SUSPENDED
from dispatch_aio.scheduler import Scheduler
from dispatch_aio.testing import Environment

APP = """
import asyncio
from dispatch_aio import Dispatch

dispatch = Dispatch()

@dispatch.function
async def double(x: int) -> int:
    return 2 * x

@dispatch.function
async def report(n: int) -> int:
    first = await double({first})
    await asyncio.sleep(3600)
    return first + await double(n)
"""


def _write_app(folder: pathlib.Path, first: str) -> str:
    path = folder / f"app_{abs(hash(first))}.py"
    path.write_text(textwrap.dedent(APP.format(first=first)))
    return f"{path}:dispatch"


def _load(spec: str) -> Dispatch:
    from dispatch_aio.cli._check import load_target

    mains = {name: sys.modules.get(name) for name in ("__main__", "__mp_main__")}
    try:
        return load_target(spec)
    finally:  # the script was loaded as __main__, as the command does
        for name, module in mains.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


async def _record(spec: str, folder: pathlib.Path) -> list[str]:
    """Run report(5) in a test environment and save the journal of each Poll."""
    dispatch = _load(spec)
    files = []
    async with Environment(dispatch, journal="whole") as env:
        await env.call(dispatch.functions["report"], 5)
        for i, response in enumerate(env.responses):
            if response.WhichOneof("directive") == "poll" and env.requests[i].function == "report":
                path = folder / f"journal-{i}.bin"
                path.write_bytes(response.poll.typed_coroutine_state.SerializeToString())
                files.append(str(path))
    return files


def test_check_files(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write_app(tmp_path, "1")
    files = asyncio.run(_record(old, tmp_path))
    assert len(files) == 3
    assert cli.main(["check", old, *files]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 journals replay; 0 diverge" in out

    changed = _write_app(tmp_path, "2")  # a changed argument: old journals diverge
    assert cli.main(["check", changed, *files]) == 1
    out = capsys.readouterr().out
    assert "DIVERGES" in out
    assert "diverged from its journal" in out
    assert "0 of 3 journals replay; 3 diverge" in out


def test_check_database(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_app(tmp_path, "1")
    data = tmp_path / "data"
    data.mkdir()

    async def suspend_a_call() -> None:
        dispatch = _load(spec)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        async with Scheduler(str(data / "scheduler.db"), api_key="k") as scheduler:
            url = await scheduler.serve("127.0.0.1", 0)
            app = Dispatch(
                api_key="k",
                api_url=url,
                endpoint_url=f"http://127.0.0.1:{port}",
                endpoint_addr=f"127.0.0.1:{port}",
                verification_key=scheduler.verification_key,
            )
            app.function(name="double")(dispatch.functions["double"].fn)
            app.function(name="report")(dispatch.functions["report"].fn)
            async with app, await app.start():
                dispatch_id = await app.functions["report"].dispatch(5)
                # Until report made its call, got the result and went to sleep for an
                # hour: suspended after its second Poll, with its journal stored.
                async with InspectClient(url, "k") as inspect:
                    for _ in range(200):
                        tree = await inspect.get_call(dispatch_id)
                        if tree.call.polls >= 2 and tree.call.state == CALL_STATE_SUSPENDED:
                            break
                        await asyncio.sleep(0.02)
                    else:
                        raise AssertionError("report never went to sleep")

    asyncio.run(suspend_a_call())
    assert cli.main(["check", spec, "--data-dir", str(data)]) == 0
    assert "1 of 1 journals replay" in capsys.readouterr().out
    changed = _write_app(tmp_path, "3")
    assert cli.main(["check", changed, "--data-dir", str(data)]) == 1
    assert "DIVERGES" in capsys.readouterr().out


def test_check_bad_app(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "no_such_module_here:dispatch", "x.bin"]) == 1
    assert "cannot import no_such_module_here" in capsys.readouterr().err
    assert cli.main(["check", str(tmp_path / "missing.py")]) == 2


MAIN_CLASSES_APP = """
import asyncio, dataclasses, sys
from pathlib import Path
from dispatch_aio import Dispatch
from dispatch_aio.testing import Environment

dispatch = Dispatch()

@dataclasses.dataclass
class Point:
    x: int
    y: int

@dispatch.function
async def show(p: Point) -> str:
    return f"{p.x},{p.y}"

@dispatch.function
async def report(n: int) -> str:
    first = await show(Point(n, n + 1))
    await asyncio.sleep(3600)
    return first + " " + await show(Point(0, n))

async def record(folder: Path) -> None:
    async with Environment(dispatch, journal="whole") as env:
        await env.call(report, 5)
    for i, response in enumerate(env.responses):
        if response.HasField("poll"):
            state = response.poll.typed_coroutine_state.SerializeToString()
            (folder / f"journal-{i}.bin").write_bytes(state)

if __name__ == "__main__":
    asyncio.run(record(Path(sys.argv[1])))
"""


def test_check_replays_inputs_holding_classes_of_the_main_script(tmp_path: pathlib.Path) -> None:
    # Recorded by `python app.py`, the journal digests inputs that pickle the script's
    # Point as __main__.Point; replayed by the command, they must pickle the same.
    script = tmp_path / "main_classes_app.py"
    script.write_text(textwrap.dedent(MAIN_CLASSES_APP))
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=60)
    files = sorted(str(p) for p in tmp_path.glob("journal-*.bin"))
    assert files
    done = subprocess.run(
        [sys.executable, "-m", "dispatch_aio", "check", f"{script}:dispatch", *files],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(files)} of {len(files)} journals replay; 0 diverge" in done.stdout


def test_check_names_the_journals_that_need_an_old_branch(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = asyncio.run(_record(_write_app(tmp_path, "1"), tmp_path))
    patch = "7 if __import__('dispatch_aio').patched('seven') else 1"
    assert cli.main(["check", _write_app(tmp_path, patch), *files]) == 0
    out = capsys.readouterr().out
    assert out.count("takes the old branch of 'seven'") == 3
    assert "patch 'seven': 3 stored journals still take its old branch" in out

    removed = "[__import__('dispatch_aio').deprecate_patch('seven'), 7][1]"
    assert cli.main(["check", _write_app(tmp_path, removed), *files]) == 1
    out = capsys.readouterr().out
    assert "0 of 3 journals replay; 3 diverge" in out
    assert "recorded before patch 'seven'" in out

    # Journals recorded with the patch need no old branch.
    new_files = asyncio.run(_record(_write_app(tmp_path, patch), tmp_path))
    assert cli.main(["check", _write_app(tmp_path, removed), *new_files]) == 0
    assert "no stored journal takes the old branch of a patch" in capsys.readouterr().out


def test_check_beside_a_running_scheduler(
    procs: Starter, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _write_app(tmp_path, "1")
    script = spec.rpartition(":")[0]
    with open(script, "a") as f:
        f.write("\nif __name__ == '__main__':\n    dispatch.run()\n")
    data = tmp_path / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(
        procs, "--port", "0", "--data-dir", str(data), "--endpoint", f"127.0.0.1:{port}"
    )
    procs([PYTHON, script], env=server.app_env())

    async def suspend_a_call() -> None:
        async with InspectClient(server.api_url, server.api_key) as inspect:
            call = Call("report", (5,))._to_proto("")
            (dispatch_id,) = await inspect.dispatch([call])
            for _ in range(500):
                tree = await inspect.get_call(dispatch_id)
                if tree.call.polls >= 2 and tree.call.state == CALL_STATE_SUSPENDED:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("report never went to sleep")

    asyncio.run(suspend_a_call())
    # The scheduler holds its database: the journals come through its API.
    assert cli.main(["check", spec, "--data-dir", str(data)]) == 0
    assert "1 of 1 journals replay" in capsys.readouterr().out
    assert cli.main(["check", _write_app(tmp_path, "3"), "--data-dir", str(data)]) == 1
    assert "DIVERGES" in capsys.readouterr().out
