"""The embedded scheduler: a Dispatch object with no API URL runs its calls itself.

Real SQLite files in a temporary data folder, the real engine, and Run requests handed
to the endpoint in memory; the API it exposes is reached over real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from dispatch_aio import Call, Client, Dispatch
from dispatch_aio.errors import ClientError, ConfigurationError, DispatchTimeoutError
from dispatch_aio.scheduler import StoreError
from dispatch_aio.scheduler.store import _sqlite

DISPATCH_AIO = str(Path(sys.executable).parent / "dispatch-aio")


def make_app(data_dir: Path, **kwargs: Any) -> tuple[Dispatch, dict[str, Any]]:
    dispatch = Dispatch(env={}, data_dir=str(data_dir), **kwargs)
    seen: dict[str, Any] = {"flaky": 0}

    @dispatch.function(name="square")
    async def square(x: int) -> int:
        return x * x

    @dispatch.function(name="flaky")
    async def flaky(x: int) -> int:
        seen["flaky"] += 1
        if seen["flaky"] < 3:
            raise ConnectionError("try again")  # a temporary status: retried
        return x

    @dispatch.function(name="fails")
    async def fails(message: str) -> None:
        raise ValueError(message)

    @dispatch.function(name="tree")
    async def tree(n: int) -> dict[str, Any]:
        squares = await asyncio.gather(*(square(i) for i in range(n)))
        await asyncio.sleep(0.05)  # suspends: a durable timer through a Poll
        try:
            await fails("boom")
        except ValueError as exc:
            caught = str(exc)
        return {"sum": sum(squares), "caught": caught, "flaky": await flaky(7)}

    seen["functions"] = (square, flaky, fails, tree)
    return dispatch, seen


async def test_a_call_tree_runs_in_process_and_is_persisted(tmp_path: Path) -> None:
    dispatch, seen = make_app(tmp_path / "data", live_timer_threshold=0.0)
    _, _, _, tree = seen["functions"]
    async with await dispatch.start() as server:
        assert server.is_embedded
        assert server.database == str(tmp_path / "data" / "scheduler.db")
        assert server.url == "http://127.0.0.1:8000"  # the URL its calls name; unserved
        dispatch_id = await tree.dispatch(10)
        result = await dispatch.client.result(dispatch_id, timeout=30)
    assert result == {"sum": 285, "caught": "boom", "flaky": 7}
    assert seen["flaky"] == 3
    mode = (tmp_path / "data").stat().st_mode & 0o777
    assert mode == 0o700
    assert (tmp_path / "data" / ".gitignore").exists()


async def test_calls_run_while_the_process_submits_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A submitter in process shares the loop with the calls' runs: even with a store
    # as eager as can be to commit on the loop's thread, they run between submissions.
    monkeypatch.setattr(_sqlite, "_INLINE_MAX", 10.0)
    monkeypatch.setattr(_sqlite.SQLiteStore, "_idle", lambda self: True)
    dispatch = Dispatch(env={}, data_dir=str(tmp_path / "data"))
    submitted = 0
    ran_after: list[int] = []  # how many submissions had returned when each call ran

    @dispatch.function(name="note")
    async def note(i: int) -> int:
        ran_after.append(submitted)
        return i

    async with await dispatch.start():
        ids = []
        for i in range(100):  # never yields but in `dispatch`
            ids.append(await note.dispatch(i))
            submitted += 1
        results = [await dispatch.client.result(i, timeout=30) for i in ids]
    assert results == list(range(100))
    assert min(ran_after) < 100  # the first calls ran while the loop went on submitting


async def test_errors_and_unknown_functions_reach_the_client(tmp_path: Path) -> None:
    dispatch, seen = make_app(tmp_path)
    _, _, fails, _ = seen["functions"]
    async with await dispatch.start():
        with pytest.raises(ValueError, match=r"^nope"):
            await dispatch.client.result(await fails.dispatch("nope"), timeout=30)
        missing = (await dispatch.client.dispatch([Call("missing")]))[0]
        with pytest.raises(Exception, match="'missing' is not registered"):
            await dispatch.client.result(missing, timeout=30)
        with pytest.raises(ClientError, match="http:// and https:// endpoints only") as info:
            await dispatch.client.dispatch([Call("square", endpoint="bridge://elsewhere")])
        assert info.value.code == "invalid_argument"
        with pytest.raises(ClientError, match="no call with dispatch id") as info:
            await dispatch.client.result("unknown-id")
        assert info.value.code == "not_found"


async def test_result_times_out_while_the_call_runs(tmp_path: Path) -> None:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))

    @dispatch.function
    async def slow() -> None:
        await asyncio.sleep(3600)

    async with await dispatch.start():
        dispatch_id = await slow.dispatch()
        with pytest.raises(DispatchTimeoutError, match=r"still runs after 0\.2 s"):
            await dispatch.client.result(dispatch_id, timeout=0.2)


async def test_result_times_out_for_a_call_that_never_ran_and_says_why(tmp_path: Path) -> None:
    dispatch = Dispatch(env={}, data_dir=str(tmp_path))

    @dispatch.function
    async def later() -> None:
        pass

    async with await dispatch.start():
        # An endpoint where nothing listens: every attempt is refused.
        call = Call(later.name, endpoint="http://127.0.0.1:9")
        (dispatch_id,) = await dispatch.client.dispatch([call])
        # The wait may end between attempts or with one in flight: both say why.
        why = r"has not run after 1 s: its \d+ attempts? failed"
        with pytest.raises(DispatchTimeoutError, match=why):
            await dispatch.client.result(dispatch_id, timeout=1)


async def test_submitting_before_the_scheduler_starts_says_what_to_do(tmp_path: Path) -> None:
    _, seen = make_app(tmp_path)
    square = seen["functions"][0]
    with pytest.raises(ConfigurationError, match=r"DISPATCH_API_URL is not set.*start\(\)"):
        await square.dispatch(2)


async def test_a_second_process_on_the_data_folder_is_refused(tmp_path: Path) -> None:
    first, _ = make_app(tmp_path)
    async with await first.start():
        script = (
            "import asyncio\nfrom dispatch_aio import Dispatch\n"
            f"d = Dispatch(data_dir={str(tmp_path)!r}, env={{}})\n"
            "asyncio.run(d.start())\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        assert "StoreInUseError" in err.decode()  # a StoreError
        assert "only one process may use a data folder" in err.decode()
        assert "DISPATCH_DATA_DIR" in err.decode()
        # Another object of this process too.
        second = Dispatch(env={}, data_dir=str(tmp_path))
        with pytest.raises(StoreError, match="in use by another process"):
            await second.start()


async def test_the_api_serves_other_programs_and_the_inspection_commands(
    tmp_path: Path,
) -> None:
    dispatch, seen = make_app(tmp_path / "data")
    square = seen["functions"][0]
    async with await dispatch.start() as server:
        assert server.api_url is not None
        connection = json.loads((tmp_path / "data" / "scheduler.json").read_text())
        assert connection["api_url"] == server.api_url
        assert server.ui_url == f"{server.api_url}/ui/#key={connection['api_key']}"
        assert (tmp_path / "data" / "scheduler.json").stat().st_mode & 0o777 == 0o600
        # Another program submits with the published key, for this app's endpoint.
        async with Client(
            api_url=server.api_url,
            api_key=connection["api_key"],
            endpoint_url=server.url,
            env={},
        ) as other:
            ids = await other.dispatch([Call("square", (12,))])
            assert await other.result(ids[0], timeout=30) == 144
        await dispatch.client.result(await square.dispatch(3), timeout=30)
        # `dispatch-aio calls` in the folder of the data finds it without options.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        proc = await asyncio.create_subprocess_exec(
            DISPATCH_AIO,
            "calls",
            "--data-dir",
            str(tmp_path / "data"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().count("square") == 2
    assert not (tmp_path / "data" / "scheduler.json").exists()


NO_CRYPTOGRAPHY = """
import asyncio, sys
from dispatch_aio import Dispatch

dispatch = Dispatch(env={}, data_dir=sys.argv[1])

@dispatch.function
async def double(x: int) -> int:
    return 2 * x

@dispatch.function
async def fan(n: int) -> int:
    return sum(await asyncio.gather(*(double(i) for i in range(n))))

async def main() -> None:
    async with await dispatch.start():
        print(await dispatch.client.result(await fan.dispatch(10), timeout=30))
    print("cryptography" in sys.modules)

asyncio.run(main())
"""


async def test_an_app_running_its_own_scheduler_never_loads_cryptography(tmp_path: Path) -> None:
    # Nothing leaves the process, so nothing is signed: 7 to 8 MB it does without. The
    # key made at the first start is kept, and loaded by whatever needs it later.
    for _ in range(2):  # the first start makes the key, the second reads it
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", NO_CRYPTOGRAPHY, str(tmp_path / "data"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().split() == ["90", "False"]


async def test_scheduler_addr_off_serves_no_api(tmp_path: Path) -> None:
    dispatch, seen = make_app(tmp_path, scheduler_addr="off")
    async with await dispatch.start() as server:
        assert server.api_url is None
        assert await dispatch.client.result(await seen["functions"][0].dispatch(5)) == 25
    assert not (tmp_path / "scheduler.json").exists()


def test_invalid_settings_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="DISPATCH_SCHEDULER_ADDR"):
        Dispatch(env={"DISPATCH_SCHEDULER_ADDR": "nowhere"})._config.scheduler_addr()
    with pytest.raises(ConfigurationError, match="DISPATCH_DATA_DIR"):
        Dispatch(env={"DISPATCH_DATA_DIR": "a\nb"})._config.data_dir()


async def test_an_unwritable_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    dispatch = Dispatch(env={}, data_dir=str(blocker / "data"))
    with pytest.raises(ConfigurationError, match="cannot create the scheduler's data folder"):
        await dispatch.start()


async def test_an_aiohttp_app_starts_the_scheduler_with_cleanup_ctx(tmp_path: Path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    dispatch, seen = make_app(tmp_path)
    square = seen["functions"][0]
    app = web.Application()
    app.add_routes(dispatch.routes())
    app.cleanup_ctx.append(dispatch.cleanup_ctx)
    async with TestServer(app):
        assert await dispatch.client.result(await square.dispatch(9), timeout=30) == 81
    with pytest.raises(ConfigurationError):  # stopped with the application
        await square.dispatch(1)


async def test_the_apps_divergence_policy_and_version(tmp_path: Path) -> None:
    from dispatch_aio.cli._inspect import InspectClient
    from dispatch_aio.errors import NondeterminismError

    # No live cache: every resume replays, and this function takes another branch then.
    dispatch = Dispatch(
        env={}, data_dir=str(tmp_path), cache_size=0, on_divergence="fail", version="2.0"
    )
    runs = {"strict": 0, "lenient": 0}

    @dispatch.function(name="one")
    async def one() -> int:
        return 1

    @dispatch.function(name="two")
    async def two() -> int:
        return 2

    async def drifting(name: str) -> int:
        runs[name] += 1
        first = await (one() if runs[name] == 1 else two())
        return first + await one()

    @dispatch.function(name="strict")
    async def strict() -> int:
        return await drifting("strict")

    @dispatch.function(name="lenient", on_divergence="restart")
    async def lenient() -> int:
        return await drifting("lenient")

    async with await dispatch.start() as server:
        strict_id = await strict.dispatch()
        with pytest.raises(NondeterminismError):
            await dispatch.client.result(strict_id, timeout=30)
        # Its own policy: restarted from its input, it then runs on one branch to the end.
        assert await dispatch.client.result(await lenient.dispatch(), timeout=30) == 3
        assert server.api_url is not None
        key = json.loads((tmp_path / "scheduler.json").read_text())["api_key"]
        async with InspectClient(server.api_url, key) as inspect:
            info = (await inspect.get_call(strict_id)).call
    assert info.version == "2.0"  # the app's version, given to the calls it submits
    assert runs["lenient"] >= 3  # first run, the diverging replay, the restart
