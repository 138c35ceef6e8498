"""The Scheduler: lifecycle, signing key, and restarts on the same database file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio._signature import private_key_to_pem, public_key_to_base64
from dispatch_aio.proto.sdk.v1 import dispatch_pb2, function_pb2
from dispatch_aio.scheduler import Scheduler, Store, StoreError

from .scripted import (
    API_KEY,
    ScriptedEndpoint,
    call,
    eventually,
    ok,
    poll,
    resumed,
    unpack_text,
)

MakeScheduler = Callable[..., Awaitable[Scheduler]]


async def test_restart_picks_up_unfinished_calls(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, new_store: Callable[[], Store]
) -> None:
    released = {"a": asyncio.Event(), "b": asyncio.Event(), "c": asyncio.Event()}

    async def child(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        value = unpack_text(req.input)
        await released[value].wait()
        return ok(value.upper())

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            calls = [call("child", v, i) for i, v in enumerate("abc", 1)]
            return poll(calls, min_results=3, state=b"parent state")
        assert req.poll_result.coroutine_state == b"parent state"
        got = {r.correlation_id: unpack_text(r.output) for r in req.poll_result.results}
        return ok(",".join(got[i] for i in sorted(got)))

    endpoint.on("child", child)
    endpoint.on("parent", parent)
    endpoint.on("top", lambda req: ok("top"))

    first = await make_scheduler(new_store(), default_endpoint=endpoint.url)
    [parent_id] = await first.dispatch([call("parent")])
    await endpoint.wait_for(lambda: len(endpoint.requests_for("child")) == 3)
    released["a"].set()
    released["b"].set()
    await eventually(lambda: first.unfinished == 2)  # the parent and c remain
    await first.close()
    assert len(endpoint.for_id(parent_id)) == 1

    second = await make_scheduler(new_store(), default_endpoint=endpoint.url)
    assert second.unfinished == 2
    released["c"].set()
    async with asyncio.timeout(5):
        result = await second.wait(parent_id)
    assert unpack_text(result.output) == "A,B,C"
    # Only c's Run was sent again; a and b were recorded before the restart.
    assert [unpack_text(r.request.input) for r in endpoint.requests_for("child")] == [
        "a",
        "b",
        "c",
        "c",
    ]
    assert second.unfinished == 0


async def test_submitted_calls_survive_a_restart_before_running(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, new_store: Callable[[], Store]
) -> None:
    gate = asyncio.Event()

    async def slow(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        await gate.wait()
        return ok(unpack_text(req.input))

    endpoint.on("slow", slow)
    first = await make_scheduler(new_store(), default_endpoint=endpoint.url, max_concurrency=1)
    ids = await first.dispatch([call("slow", str(i)) for i in range(5)])
    await endpoint.wait_for(lambda: len(endpoint.received) == 1)
    await first.close()
    gate.set()
    second = await make_scheduler(new_store(), default_endpoint=endpoint.url)
    async with asyncio.timeout(5):
        outputs = [unpack_text((await second.wait(i)).output) for i in ids]
    assert outputs == ["0", "1", "2", "3", "4"]


async def test_max_wait_that_elapsed_while_down_resumes_at_once(
    endpoint: ScriptedEndpoint, make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    db = str(tmp_path / "calls.db")
    endpoint.on("sleeper", lambda req: ok("woke") if resumed(req) else poll(max_wait=1.0))
    first = await make_scheduler(db, default_endpoint=endpoint.url)
    [dispatch_id] = await first.dispatch([call("sleeper")])
    await eventually(lambda: first._engine.live_view(dispatch_id) == (False, 0))  # type: ignore[union-attr]
    await first.close()
    await asyncio.sleep(1.1)
    second = await make_scheduler(db, default_endpoint=endpoint.url)
    start = time.monotonic()
    async with asyncio.timeout(5):
        assert unpack_text((await second.wait(dispatch_id)).output) == "woke"
    assert time.monotonic() - start < 0.7  # not another max_wait (1 s) of waiting


async def test_signing_key_is_generated_once_and_kept(
    tmp_path: Path, new_store: Callable[[], Store]
) -> None:
    async with Scheduler(new_store(), api_key=API_KEY) as first:
        key = first.verification_key
    async with Scheduler(new_store(), api_key=API_KEY) as second:
        assert second.verification_key == key
    async with Scheduler(str(tmp_path / "other.db"), api_key=API_KEY) as third:
        assert third.verification_key != key


async def test_explicit_signing_key_in_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with Scheduler(api_key=API_KEY, signing_key=private_key_to_pem(key)) as s:
        assert s.verification_key == public_key_to_base64(key.public_key())


async def test_serve_binds_a_port_and_close_releases_it() -> None:
    async with Scheduler(api_key=API_KEY) as s:
        url = await s.serve()
        assert s.url == url
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            req = dispatch_pb2.DispatchRequest()
            async with http.post(
                url + "/dispatch.sdk.v1.DispatchService/Dispatch",
                data=req.SerializeToString(),
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as resp:
                assert resp.status == 200
    assert s.url is None
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post(url + "/dispatch.sdk.v1.DispatchService/Dispatch")


async def test_a_second_scheduler_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "calls.db")
    async with Scheduler(db, api_key=API_KEY):
        with pytest.raises(StoreError, match="another scheduler"):
            await Scheduler(db, api_key=API_KEY).start()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"api_key": ""}, "api_key must not be empty"),
        ({"api_key": "k", "default_endpoint": "ftp://x"}, "default_endpoint 'ftp://x'"),
        ({"api_key": "k", "default_expiration": 0}, "default_expiration must be positive"),
        ({"api_key": "k", "max_concurrency": 0}, "max_concurrency must be at least 1"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Scheduler(**kwargs)  # type: ignore[arg-type]


async def test_using_a_scheduler_before_start_says_so() -> None:
    s = Scheduler(api_key=API_KEY)
    with pytest.raises(RuntimeError, match="not started"):
        await s.dispatch([])
    with pytest.raises(RuntimeError, match="not started"):
        _ = s.app


async def test_wait_for_an_unknown_call(make_scheduler: MakeScheduler) -> None:
    s = await make_scheduler()
    with pytest.raises(LookupError, match="no call with dispatch id 'nope'"):
        await s.wait("nope")


async def test_invalid_calls_submitted_in_process(make_scheduler: MakeScheduler) -> None:
    s = await make_scheduler()
    with pytest.raises(ValueError, match=r"calls\[0\].endpoint is missing"):
        await s.dispatch([call("f")])
