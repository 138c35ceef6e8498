"""Idempotent submission: a key submitted twice creates one call, whose id both get."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from dispatch_aio.proto.sdk.v1 import dispatch_pb2
from dispatch_aio.proto.v1 import inspect_pb2
from dispatch_aio.scheduler import Scheduler

from .scripted import API_KEY, ScriptedEndpoint, call, ok, unpack_text

DISPATCH = "/dispatch.sdk.v1.DispatchService/Dispatch"
LIST_CALLS = "/dispatch_aio.v1.InspectService/ListCalls"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/proto"}


class Api:
    def __init__(self, http: aiohttp.ClientSession, url: str, endpoint: ScriptedEndpoint) -> None:
        self.http = http
        self.url = url
        self.endpoint = endpoint

    async def submit(self, values: list[str], keys: list[str]) -> tuple[int, bytes]:
        calls = [call("echo", v, endpoint=self.endpoint.url) for v in values]
        body = dispatch_pb2.DispatchRequest(calls=calls, idempotency_keys=keys)
        async with self.http.post(
            self.url + DISPATCH, data=body.SerializeToString(), headers=HEADERS
        ) as resp:
            return resp.status, await resp.read()

    async def dispatch(self, values: list[str], keys: list[str]) -> list[str]:
        status, body = await self.submit(values, keys)
        assert status == 200, body
        return list(dispatch_pb2.DispatchResponse.FromString(body).dispatch_ids)

    async def calls(self) -> list[str]:
        body = inspect_pb2.ListCallsRequest().SerializeToString()
        async with self.http.post(self.url + LIST_CALLS, data=body, headers=HEADERS) as resp:
            assert resp.status == 200
            listed = inspect_pb2.ListCallsResponse.FromString(await resp.read())
        return [c.dispatch_id for c in listed.calls]


@pytest.fixture
async def serve(
    endpoint: ScriptedEndpoint, make_scheduler: Callable[..., Awaitable[Scheduler]]
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    endpoint.on("echo", lambda req: ok(unpack_text(req.input) + "!"))
    async with aiohttp.ClientSession() as http:

        async def start(**kwargs: object) -> Api:
            scheduler = await make_scheduler(**kwargs)
            return Api(http, await scheduler.serve(), endpoint)

        yield start


async def test_a_key_submitted_twice_makes_one_call(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve()
    first = await api.dispatch(["a", "b", "c"], ["k-a", "", "k-c"])
    # A repeat of the batch with one new call: only the unkeyed and new calls are made.
    second = await api.dispatch(["a", "b", "c", "d"], ["k-a", "", "k-c", "k-d"])
    assert second[0] == first[0] and second[2] == first[2]
    assert second[1] != first[1]
    assert sorted(await api.calls()) == sorted({*first, *second})
    assert len(await api.calls()) == 5


async def test_a_new_key_costs_the_submission_no_lookup(
    make_scheduler: Callable[..., Awaitable[Scheduler]],
    endpoint: ScriptedEndpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Clients key every submission for their retries: a new key is the common case, and
    # the write that stores it is what finds a key taken.
    endpoint.on("echo", lambda req: ok("done"))
    scheduler = await make_scheduler()
    store = scheduler._store
    lookups: list[list[str]] = []
    find = store.find_idempotency_keys

    async def counted(keys: list[str], now: float) -> dict[str, str]:
        lookups.append(list(keys))
        return await find(keys, now)

    monkeypatch.setattr(store, "find_idempotency_keys", counted)
    echo = [call("echo", "a", endpoint=endpoint.url)]
    first = await scheduler.dispatch(echo, idempotency_keys=["k1"])
    second = await scheduler.dispatch(echo, idempotency_keys=["k2"])
    assert lookups == []
    assert await scheduler.dispatch(echo, idempotency_keys=["k1"]) == first
    assert lookups == [["k1"]]
    assert first != second


async def test_concurrent_submissions_of_one_key_make_one_call(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve()
    ids = await asyncio.gather(*(api.dispatch(["x"], ["same"]) for _ in range(10)))
    assert len({tuple(i) for i in ids}) == 1
    assert await api.calls() == ids[0]
    await asyncio.sleep(0.1)
    assert len(api.endpoint.received) == 1


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (["k", "k"], "calls[0] and calls[1] have the same idempotency key 'k'"),
        (["k"], "1 idempotency keys for 2 calls"),
        (["k", "bad\nkey"], "calls[1]: invalid idempotency key 'bad\\nkey'"),
        (["k", "x" * 257], "at most 256 printable characters"),
    ],
)
async def test_invalid_keys_are_refused_and_nothing_is_made(
    serve: Callable[..., Awaitable[Api]], keys: list[str], words: str
) -> None:
    api = await serve()
    status, body = await api.submit(["a", "b"], keys)
    assert status == 400
    error = json.loads(body)
    assert error["code"] == "invalid_argument"
    assert words in error["message"]
    assert await api.calls() == []


async def test_a_key_is_forgotten_after_the_retention(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve(idempotency_retention=0.2)
    first = await api.dispatch(["a"], ["k"])
    assert await api.dispatch(["a"], ["k"]) == first
    await asyncio.sleep(0.3)
    second = await api.dispatch(["a"], ["k"])
    assert second != first
    assert await api.dispatch(["a"], ["k"]) == second


async def test_keys_survive_a_restart_of_the_scheduler(
    make_scheduler: Callable[..., Awaitable[Scheduler]],
    endpoint: ScriptedEndpoint,
    tmp_path: Path,
) -> None:
    endpoint.on("echo", lambda req: ok("done"))
    path = f"{tmp_path}/calls.db"
    first = await make_scheduler(path)
    (dispatch_id,) = await first.dispatch(
        [call("echo", "a", endpoint=endpoint.url)], idempotency_keys=["k"]
    )
    await first.wait(dispatch_id)
    await first.close()
    again = await make_scheduler(path)
    assert await again.dispatch(
        [call("echo", "a", endpoint=endpoint.url)], idempotency_keys=["k"]
    ) == [dispatch_id]


def test_retention_must_be_positive() -> None:
    with pytest.raises(ValueError, match="idempotency_retention must be positive"):
        Scheduler(api_key="k", idempotency_retention=0)
