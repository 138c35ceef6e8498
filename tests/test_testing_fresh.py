"""dispatch_aio.testing with replay="process": every Run request in a new process.

Replaying in the same process proves nothing about what survives a restart: there,
cloudpickle hands back the original class of a value pickled by value. These tests
run each request in a new Python process, as a scheduler that restarts the app
before every resume would, and check what the program sees there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from durable.workflows import FUNCTIONS, IDENTITY_FUNCTIONS, mixed, survey

from dispatch_aio import Dispatch, _codec
from dispatch_aio._replay_worker import Setup, locate, module_file
from dispatch_aio._status import Status
from dispatch_aio.errors import PermanentError
from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.proto.v1 import journal_pb2
from dispatch_aio.testing import Environment, WorkerError, WorkerPool

dispatch = Dispatch()
logger = logging.getLogger("tests.fresh")


@dispatch.function
async def whoami() -> int:
    return os.getpid()


@dispatch.function
async def pids() -> list[int]:
    first = await whoami()
    await asyncio.sleep(3600)
    second = await whoami()
    return [first, second, os.getpid()]


@dispatch.function
async def chatty(x: int) -> int:
    print("printed by the function, not part of the protocol")
    logger.info("got %d", x)
    await asyncio.sleep(0.5)  # a live timer, waited out on the worker's virtual clock
    return x + 1


@dispatch.function
async def crash(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    os._exit(7)


@dispatch.function
async def announce(message: str) -> str:
    return await publish(message)


@dispatch.function
async def publish(message: str) -> str:
    raise PermanentError("no network in tests")


@dispatch.function
async def blocked(path: str) -> None:
    await asyncio.to_thread(Path(path).write_text, str(os.getpid()))
    await asyncio.to_thread(time.sleep, 60)


_RUNS: list[str] = []  # a new process starts with it empty


@dispatch.function
async def where(name: str) -> dict[str, Any]:
    _RUNS.append(name)
    return {
        "runs": len(_RUNS),
        "hash": hash(name),
        "pid": os.getpid(),
        "value": os.environ.get("FRESH_TEST_VALUE"),
        "cwd": os.getcwd(),
    }


async def _views(pool: WorkerPool, count: int) -> list[dict[str, Any]]:
    async with Environment(dispatch, replay="process", workers=pool) as env:
        return [await env.call(where, "same string") for _ in range(count)]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
async def test_each_worker_is_a_new_process_with_the_parents_environment_at_the_time(
    method: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if method == "forkserver" and sys.platform != "linux":
        pytest.skip("fork servers are Linux only")
    monkeypatch.setenv("FRESH_TEST_VALUE", "before")
    with WorkerPool(spares=0, method=method) as pool:
        before = await _views(pool, 1)
        monkeypatch.setenv("FRESH_TEST_VALUE", "after")
        monkeypatch.chdir(tmp_path)
        after = await _views(pool, 4)
        assert pool.started == 5
    assert before[0]["value"] == "before"
    assert [v["value"] for v in after] == ["after"] * 4
    assert {v["cwd"] for v in after} == {str(tmp_path)}
    assert [v["runs"] for v in before + after] == [1] * 5  # the module loaded afresh each time
    assert len({v["pid"] for v in before + after} | {os.getpid()}) == 6
    if "PYTHONHASHSEED" not in os.environ:
        # As restarted apps: consecutive requests hash strings differently.
        hashes = [v["hash"] for v in after]
        assert all(a != b for a, b in itertools.pairwise(hashes)), hashes


@pytest.mark.skipif(sys.platform != "linux", reason="fork servers are Linux only")
async def test_workers_are_new_interpreters_once_the_fork_servers_die() -> None:
    with WorkerPool(spares=0, method="forkserver") as pool:
        first = await _views(pool, 1)
        for server in pool._servers:
            server._process.kill()
            server._process.wait()
        second = await _views(pool, 2)
    assert [v["runs"] for v in first + second] == [1, 1, 1]
    assert len({v["pid"] for v in first + second}) == 3


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="'forkserver' or 'spawn', not 'fork'"):
        WorkerPool(method="fork")  # type: ignore[arg-type]


async def test_every_request_runs_in_a_new_process(dispatch_workers: WorkerPool) -> None:
    interpreters = dispatch_workers.started
    async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
        started = env.time()
        first, second, last = await env.call(pids)
        assert env.time() - started >= 3600  # virtual time, moved by the worker's clock
    assert len({first, second, last, os.getpid()}) == 4
    assert dispatch_workers.started - interpreters >= len(env.requests) == 6


async def test_workflows_agree_with_the_in_process_modes(dispatch_workers: WorkerPool) -> None:
    def comparable(result: dict[str, Any]) -> dict[str, Any]:
        del result["token"]  # drawn from the run's seed
        # Which results come first depends on delivery (the modes deliver differently).
        return {k: sorted(v) if isinstance(v, list) else v for k, v in result.items()}

    async with Environment(FUNCTIONS) as env:
        expected = comparable(await env.call(mixed, 4))
    async with Environment(FUNCTIONS, replay="process", workers=dispatch_workers) as env:
        assert comparable(await env.call(mixed, 4)) == expected


async def test_the_golden_journal_replays_in_a_new_interpreter(
    dispatch_workers: WorkerPool,
) -> None:
    """The committed journal of `mixed`, resumed as a restarted app would resume it."""
    golden = Path(__file__).parent / "durable" / "golden"
    data = (golden / "mixed-v1.bin").read_bytes()
    request = function_pb2.RunRequest.FromString(data)
    journal = journal_pb2.Journal.FromString(request.poll_result.typed_coroutine_state.value)
    setup = Setup.current([module_file(mixed.fn.__module__)])
    resume_at = journal.epochs[-1].time + 86400  # a day after it was recorded
    _, answer = await dispatch_workers.run(setup, locate(mixed, None), resume_at, data)
    response = function_pb2.RunResponse.FromString(answer)
    assert response.status == Status.OK, response
    expected = json.loads((golden / "mixed-v1.json").read_text())["result"]
    assert _codec.decode_value(response.exit.result.output) == expected


@pytest.mark.parametrize("replay", ["cached", "process"])
async def test_classes_of_a_module_keep_their_identity(
    dispatch_workers: WorkerPool, replay: str
) -> None:
    async with Environment(IDENTITY_FUNCTIONS, replay=replay, workers=dispatch_workers) as env:
        report = await env.call(survey, ["cpu", "disk", "gpu0000"])
    assert report == {"cpu": "ok", "disk": "ok", "gpu0000": "overheated 27.0"}


async def test_stubs_run_in_process(dispatch_workers: WorkerPool) -> None:
    calls = []

    async def fake_publish(message: str) -> str:
        calls.append(os.getpid())
        return f"published {message}"

    async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
        env.stub(publish, fake_publish)
        assert await env.call(announce, "hi") == "published hi"
    assert calls == [os.getpid()]


async def test_errors_cross_as_themselves(dispatch_workers: WorkerPool) -> None:
    async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
        with pytest.raises(PermanentError, match="no network"):
            await env.call(announce, "hi")


async def test_logs_and_prints_of_workers(
    dispatch_workers: WorkerPool,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="tests.fresh")
    async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
        started = env.time()
        assert await env.call(chatty, 1) == 2
        assert env.time() - started >= 0.5
    [record] = [r for r in caplog.records if r.name == "tests.fresh"]
    assert record.getMessage() == "got 1"
    assert isinstance(record.process, int)
    assert record.process != os.getpid()
    _, err = capfd.readouterr()
    assert "printed by the function" in err


async def test_a_crashing_worker_fails_the_test_with_its_stderr(
    dispatch_workers: WorkerPool,
) -> None:
    async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
        with pytest.raises(WorkerError, match="'crash' failed \\(exit status 7\\)") as info:
            await env.call(crash, "last words before the crash")
    assert "last words before the crash" in str(info.value)


async def test_code_a_new_interpreter_cannot_find(dispatch_workers: WorkerPool) -> None:
    @dispatch.function(name="registered_in_a_test")
    async def local() -> int:
        return 1

    async with Environment(dispatch, replay="process", workers=dispatch_workers) as env:
        with pytest.raises(WorkerError, match="registered at run time") as info:
            await env.call(local)
    assert "'registered_in_a_test' is not registered on test_testing_fresh.dispatch" in str(
        info.value
    )

    async with Environment([local], replay="process", workers=dispatch_workers) as env:
        with pytest.raises(WorkerError, match="not a module-level name of 'test_testing_fresh'"):
            await env.call(local)


async def test_a_module_that_fails_to_import_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dispatch_workers: WorkerPool
) -> None:
    source = tmp_path / "parent_only.py"
    source.write_text(
        textwrap.dedent(
            """
            import os
            from dispatch_aio import Dispatch

            if os.environ.get("DISPATCH_AIO_REPLAY_WORKER"):
                raise ImportError("this module only imports in the parent")

            dispatch = Dispatch()

            @dispatch.function
            async def hello() -> str:
                return "hello"
            """
        )
    )
    spec = importlib.util.spec_from_file_location("parent_only_module", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    async with Environment(module.dispatch, replay="process", workers=dispatch_workers) as env:
        with pytest.raises(WorkerError, match="'hello' failed \\(exit status 1\\)") as info:
            await env.call(module.hello)
    assert "ImportError: this module only imports in the parent" in str(info.value)


async def test_cancelled_calls_stop_their_worker(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    with WorkerPool(spares=0) as pool:
        async with Environment(dispatch, replay="process", workers=pool) as env:
            task = asyncio.ensure_future(env.call(blocked, str(marker)))
            for _ in range(200):
                if marker.exists() and marker.read_text():
                    break
                await asyncio.sleep(0.05)
            pid = int(marker.read_text())
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"worker {pid} still runs")


async def test_an_environment_starts_its_own_pool() -> None:
    async with Environment(dispatch, replay="process") as env:
        assert await env.call(whoami) != os.getpid()


# -- the main script ------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import dataclasses
    import json
    import os

    from dispatch_aio import Dispatch
    from dispatch_aio.testing import Environment

    dispatch = Dispatch()


    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int
        y: int


    class Boom(Exception):
        pass


    @dispatch.function
    async def make_point(x: int) -> Point:
        return Point(x, -x)


    @dispatch.function
    async def explode(message: str) -> None:
        raise Boom(message)


    @dispatch.function
    async def main_workflow(x: int) -> dict[str, object]:
        point = await make_point(x)
        try:
            await explode("bang")
            caught = "nothing raised"
        except Boom as exc:
            caught = f"Boom({exc})"
        except Exception as exc:
            caught = f"not a Boom: {type(exc)!r}"
        return {
            "isinstance": isinstance(point, Point),
            "caught": caught,
            "pid": os.getpid(),
        }


    async def main() -> None:
        async with Environment(dispatch, replay="process") as env:
            result = await env.call(main_workflow, 3)
            result["point_is_main_class"] = isinstance(env.calls(make_point)[0].output, Point)
        result["parent"] = os.getpid()
        print(json.dumps(result))


    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def run_script(directory: Path, source: str) -> dict[str, Any]:
    script = directory / "app.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=directory
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_classes_of_the_main_script_keep_their_identity(tmp_path: Path) -> None:
    """The worker loads the script as __mp_main__ for __main__: references resolve there."""
    result = run_script(tmp_path, SCRIPT)
    assert result["pid"] != result["parent"]  # the workflow ran in another process
    assert result["isinstance"] is True
    assert result["caught"] == "Boom(bang)"
    assert result["point_is_main_class"] is True


def test_the_check_fails_when_main_classes_travel_by_value(tmp_path: Path) -> None:
    """The control: pickled by value, as cloudpickle does by itself, the classes are look-alikes.

    This is what the test above would see without the codec's by-reference pickling of
    the main script's classes, and what any test replaying in one process cannot see.
    """
    assert hasattr(_codec, "_is_main_name"), "update this control to the codec's new hook"
    disable = "from dispatch_aio import _codec\n_codec._is_main_name = lambda obj: False\n"
    result = run_script(tmp_path, disable + SCRIPT)
    assert result["isinstance"] is False
    assert result["caught"] == "not a Boom: <class '__main__.Boom'>"
    assert result["point_is_main_class"] is False


def test_functions_of_a_program_that_cannot_be_loaded_again(tmp_path: Path) -> None:
    # python -c: there is no script for a new interpreter to load.
    program = SCRIPT.replace(
        "asyncio.run(main())",
        "try:\n        asyncio.run(main())\n"
        "    except Exception as exc:\n        print(json.dumps({'error': str(exc)}))",
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    error = json.loads(done.stdout)["error"]
    assert "'main_workflow' (__main__:main_workflow) is defined in the main module" in error
    assert "define it in an importable module" in error
