"""The web UI's pages and JSON endpoints, on a scheduler running a real app over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dispatch_aio.proto.v1 import schedule_pb2
from dispatch_aio.scheduler import _ui
from dispatch_aio.scheduler._ui import ui_address

from .ui_workload import API_KEY, SCRIPT, Workload, serve_workload

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def workload() -> AsyncIterator[Workload]:
    async with serve_workload() as served:
        yield served


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str, expect: int = 200, **params: Any) -> Any:
    async with http.get(url, headers=AUTH, params=params) as resp:
        assert resp.status == expect, await resp.text()
        return await resp.json()


def test_the_address_carries_the_key_in_its_fragment() -> None:
    url = ui_address("http://127.0.0.1:4450/", "a b/c")
    assert url == "http://127.0.0.1:4450/ui/#key=a%20b%2Fc"


async def test_pages_hold_no_data_and_data_needs_the_key(
    workload: Workload, http: aiohttp.ClientSession
) -> None:
    dispatch_id = await workload.submit("shout")
    await workload.finish(dispatch_id)
    base = workload.api_url
    async with http.get(base + "/ui", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/ui/"
    for name in ("", "ui.js", "ui.css"):
        async with http.get(f"{base}/ui/{name}") as resp:
            assert resp.status == 200
            body = await resp.text()
            assert dispatch_id not in body
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    for path in ("/ui/api/calls", f"/ui/api/calls/{dispatch_id}"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            async with http.get(base + path, headers=headers) as resp:
                assert resp.status == 401
                assert "API key" in (await resp.json())["error"]
                assert dispatch_id not in await resp.text()
    async with http.get(base + "/ui/missing.js") as resp:
        assert resp.status == 404


async def test_calls_list_newest_first_with_filters_and_pages(
    workload: Workload, http: aiohttp.ClientSession
) -> None:
    ids = [
        await workload.submit("fanout", 3),
        await workload.submit("shout"),
        await workload.submit("explode", "top"),
    ]
    for dispatch_id in ids:
        await workload.finish(dispatch_id)
    waiting = await workload.submit("waits", "w")
    url = workload.api_url + "/ui/api/calls"

    top = await get_json(http, url, top="1")
    assert [c["id"] for c in top["calls"]] == [waiting, *reversed(ids)]
    assert top["next"] == ""
    fanout = top["calls"][-1]
    assert fanout["function"] == "fanout"
    assert fanout["state"] == "done"
    assert fanout["status"] == "ok"
    assert fanout["child_count"] == 5  # 3 squares, explode, shout
    assert fanout["input"] == "(3)"
    assert SCRIPT in fanout["output"]
    explode = top["calls"][1]
    assert explode["error"] == {"type": "ValueError", "message": "<b>top</b> went wrong"}

    everything = await get_json(http, url)
    assert len(everything["calls"]) == 4 + 5

    failed = await get_json(http, url, status="failed")
    assert {c["function"] for c in failed["calls"]} == {"explode"}
    assert len(failed["calls"]) == 2  # the top-level one and fanout's child
    assert [c["id"] for c in (await get_json(http, url, state="done", top="1"))["calls"]] == [
        *reversed(ids)
    ]
    unfinished = await get_json(http, url, state=["pending", "running", "suspended"])
    assert [c["id"] for c in unfinished["calls"]] == [waiting]
    assert [c["function"] for c in (await get_json(http, url, function="SQU"))["calls"]] == [
        "square"
    ] * 3
    assert (await get_json(http, url, since=str(time.time() + 60)))["calls"] == []

    first = await get_json(http, url, top="1", limit="2")
    assert [c["id"] for c in first["calls"]] == [waiting, ids[2]]
    second = await get_json(http, url, top="1", limit="2", before=first["next"])
    assert [c["id"] for c in second["calls"]] == [ids[1], ids[0]]
    assert second["next"] == ""

    for bad in ({"state": "bogus"}, {"status": "bogus"}, {"since": "x"}, {"before": "-1"}):
        assert "error" in await get_json(http, url, 400, **bad)


async def test_a_call_with_its_tree_error_and_traceback(
    workload: Workload, http: aiohttp.ClientSession
) -> None:
    root = await workload.submit("fanout", 2)
    await workload.finish(root)
    url = workload.api_url + "/ui/api/calls/"
    data = await get_json(http, url + root)
    tree = data["tree"]
    assert tree["id"] == root
    children = tree["children"]
    assert [c["function"] for c in children] == ["square", "square", "explode", "shout"]
    assert all(c["created"] >= tree["created"] and c["finished"] for c in children)
    assert children[1]["output"] == "1"
    assert children[3]["output"] == repr(SCRIPT)

    explode = children[2]["id"]
    answer = await get_json(http, url + explode)
    assert answer["tree"]["id"] == root  # the whole tree, for context
    detail = answer["call"]
    assert detail["parent"] == root
    assert detail["status"] == "invalid_argument"
    assert detail["input"] == "('child')"
    error = detail["error"]
    assert error["message"] == "<b>child</b> went wrong"
    assert "ValueError: <b>child</b> went wrong" in error["traceback"]
    assert error["value"].startswith("<ValueError('<b>child</b> went wrong'")
    assert detail["journal"] is None  # a finished run keeps no journal
    (attempt,) = detail["attempts"]  # one Run request, which failed
    assert (attempt["number"], attempt["status"]) == (1, "invalid_argument")
    assert "<b>child</b> went wrong" in attempt["outcome"]
    assert attempt["started"] <= attempt["finished"]
    # The fan-out: its first run, and a resume for each batch of its children's results.
    runs = data["call"]["attempts"]
    assert [a["number"] for a in runs] == list(range(1, len(runs) + 1)) and len(runs) >= 2
    assert runs[0]["outcome"].startswith("suspended, made ")
    assert runs[-1]["outcome"] == "ok"

    assert "no call" in (await get_json(http, url + "nope", 404))["error"]


async def test_a_suspended_call_shows_its_journal(
    workload: Workload, http: aiohttp.ClientSession
) -> None:
    waiting = await workload.submit("waits", "w")
    url = f"{workload.api_url}/ui/api/calls/{waiting}"
    async with asyncio.timeout(15):
        while True:
            call = (await get_json(http, url))["call"]
            journal = call["journal"]
            if journal and any(step["kind"] == "timer" for step in journal["steps"]):
                break
            await asyncio.sleep(0.1)
    assert call["state"] in ("suspended", "running", "pending")
    assert journal["function"] == "waits"
    assert journal["polls"] >= 2
    workload.release.set()
    await workload.finish(waiting)
    done = (await get_json(http, url))["call"]
    assert done["output"] == "'w'"
    assert done["journal"] is None


async def test_a_cancelled_call_is_marked(workload: Workload, http: aiohttp.ClientSession) -> None:
    waiting = await workload.submit("waits", "w")
    url = f"{workload.api_url}/ui/api/calls/{waiting}"
    assert (await get_json(http, url))["call"]["cancelled"] is False
    assert await workload.scheduler.cancel(waiting) == 1
    call = (await get_json(http, url))["call"]
    assert (call["state"], call["status"], call["cancelled"]) == ("done", "permanent_error", True)
    assert f"call {waiting} (waits) was cancelled" in call["last_error"]


async def test_actions_need_the_key_and_say_what_was_wrong(
    workload: Workload, http: aiohttp.ClientSession
) -> None:
    base = workload.api_url
    waiting = await workload.submit("waits", "w")
    cancel, events = f"{base}/ui/api/calls/{waiting}/cancel", f"{base}/ui/api/events"
    for url in (cancel, events):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.post(url, headers=headers, json={"key": "k"}) as resp:
                assert resp.status == 401, await resp.text()
    assert not (await get_json(http, f"{base}/ui/api/calls/{waiting}"))["call"]["cancelled"]

    async def post(url: str, body: object, expect: int) -> Any:
        async with http.post(url, headers=AUTH, json=body) as resp:
            assert resp.status == expect, await resp.text()
            return await resp.json()

    assert await post(f"{base}/ui/api/calls/no-such-id/cancel", {}, 404) == {
        "error": "no call with dispatch id 'no-such-id'"
    }
    assert await post(cancel, {}, 200) == {"cancelled": True, "stopped": 1}
    assert await post(cancel, {}, 200) == {"cancelled": False, "stopped": 0}
    for body in ([], {"value": 1}, {"key": 3}, {"key": "k", "error": 3}):
        assert "send {" in (await post(events, body, 400))["error"]
    assert "key" in (await post(events, {"key": ""}, 400))["error"]
    assert await post(events, {"key": "k", "error": "refused"}, 200) == {"woken": 0}
    assert "already resolved" in (await post(events, {"key": "k", "value": 1}, 409))["error"]


async def test_schedules_are_listed_and_paused(
    workload: Workload, http: aiohttp.ClientSession
) -> None:
    base = workload.api_url
    assert (await get_json(http, f"{base}/ui/api/schedules"))["schedules"] == []
    spec = schedule_pb2.Schedule(
        id="nightly",
        function="shout",
        endpoint=workload.endpoint,
        missed=schedule_pb2.MISSED_POLICY_ONCE,
    )
    spec.cron.expression = "0 2 * * *"
    spec.cron.time_zone = "Europe/Paris"
    await workload.scheduler.schedules.create(spec)
    (listed,) = (await get_json(http, f"{base}/ui/api/schedules"))["schedules"]
    assert {k: listed[k] for k in ("id", "function", "input", "timing", "missed", "paused")} == {
        "id": "nightly",
        "function": "shout",
        "input": "()",
        "timing": "cron 0 2 * * * (Europe/Paris)",
        "missed": "once",
        "paused": False,
    }
    assert listed["next"] > time.time()

    async def post(action: str, expect: int, schedule_id: str = "nightly") -> Any:
        url = f"{base}/ui/api/schedules/{schedule_id}/{action}"
        async with http.post(url, headers=AUTH) as resp:
            assert resp.status == expect, await resp.text()
            return await resp.json()

    async with http.post(f"{base}/ui/api/schedules/nightly/pause") as resp:
        assert resp.status == 401  # no key
    paused = await post("pause", 200)
    assert (paused["paused"], paused["next"]) == (True, None)
    assert workload.scheduler.schedules.list()[0].paused
    assert (await post("resume", 200))["paused"] is False
    assert "no schedule with id 'none'" in (await post("pause", 404, "none"))["error"]


async def test_pages_read_the_store_in_chunks_from_the_newest(
    workload: Workload, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ui, "_SCAN", 2)  # rows per read of the store: many reads here
    explode = await workload.submit("explode", "x")
    shouts = [await workload.submit("shout") for _ in range(5)]
    for dispatch_id in (explode, *shouts):
        await workload.finish(dispatch_id)
    url = workload.api_url + "/ui/api/calls"
    # A match far behind the newest calls is found by reading back chunk after chunk.
    page = await get_json(http, url, function="expl", top="1")
    assert [c["id"] for c in page["calls"]] == [explode] and page["next"] == ""
    seen: list[str] = []
    before = ""
    while True:
        page = await get_json(http, url, function="shout", top="1", limit="2", before=before)
        seen += [c["id"] for c in page["calls"]]
        before = page["next"]
        if not before:
            break
    assert seen == shouts[::-1]
