"""The HTTP API: DispatchService (Dispatch, Wait) and InspectService, binary and JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from dispatch_aio.proto.sdk.v1 import call_pb2, dispatch_pb2, function_pb2, status_pb2
from dispatch_aio.proto.v1 import inspect_pb2
from dispatch_aio.scheduler import Scheduler

from .scripted import API_KEY, ScriptedEndpoint, call, fail, ok, poll, resumed, unpack_text

DISPATCH = "/dispatch.sdk.v1.DispatchService/Dispatch"
WAIT = "/dispatch.sdk.v1.DispatchService/Wait"
INSPECT = "/dispatch_aio.v1.InspectService/"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROTO = {"Content-Type": "application/proto"}


class Api:
    def __init__(self, http: aiohttp.ClientSession, url: str, endpoint: ScriptedEndpoint) -> None:
        self.http = http
        self.url = url
        self.endpoint = endpoint

    async def post(
        self, path: str, body: bytes | str, headers: dict[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        data = body.encode() if isinstance(body, str) else body
        async with self.http.post(self.url + path, data=data, headers=headers) as resp:
            return resp.status, resp.content_type, await resp.read()

    async def rpc(self, path: str, message: Message, response: Message) -> Any:
        status, ctype, body = await self.post(path, message.SerializeToString(), AUTH | PROTO)
        assert (status, ctype) == (200, "application/proto"), body
        response.ParseFromString(body)
        return response

    async def rpc_json(self, path: str, message: dict[str, Any]) -> Any:
        headers = AUTH | {"Content-Type": "application/json"}
        status, ctype, body = await self.post(path, json.dumps(message), headers)
        assert (status, ctype) == (200, "application/json"), body
        return json.loads(body)

    async def dispatch(self, *calls: call_pb2.Call) -> list[str]:
        req = dispatch_pb2.DispatchRequest(calls=calls)
        resp = await self.rpc(DISPATCH, req, dispatch_pb2.DispatchResponse())
        return list(resp.dispatch_ids)

    async def wait(self, dispatch_id: str) -> call_pb2.CallResult:
        async with asyncio.timeout(10):
            status, ctype, body = await self.post(WAIT, dispatch_id, AUTH)
        assert (status, ctype) == (200, "application/proto"), body
        return call_pb2.CallResult.FromString(body)


@pytest.fixture
async def api(
    endpoint: ScriptedEndpoint, make_scheduler: Callable[..., Awaitable[Scheduler]]
) -> AsyncIterator[Api]:
    s = await make_scheduler()
    url = await s.serve()
    endpoint.on("echo", lambda req: ok(unpack_text(req.input) + "!"))
    async with aiohttp.ClientSession() as http:
        yield Api(http, url, endpoint)


def echo(value: str, endpoint: ScriptedEndpoint) -> call_pb2.Call:
    return call("echo", value, endpoint=endpoint.url)


async def test_dispatch_returns_ids_in_request_order(api: Api) -> None:
    values = [str(i) for i in range(6)]
    ids = await api.dispatch(*(echo(v, api.endpoint) for v in values))
    assert len(set(ids)) == 6
    for dispatch_id, value in zip(ids, values, strict=True):
        assert unpack_text((await api.wait(dispatch_id)).output) == value + "!"


async def test_dispatch_over_json(api: Api) -> None:
    body = {
        "calls": [
            {
                "function": "echo",
                "endpoint": api.endpoint.url,
                "input": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "j"},
            }
        ]
    }
    reply = await api.rpc_json(DISPATCH, body)
    [dispatch_id] = reply["dispatchIds"]
    assert unpack_text((await api.wait(dispatch_id)).output) == "j!"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}],
    ids=["missing", "wrong-key", "wrong-scheme"],
)
@pytest.mark.parametrize("path", [DISPATCH, WAIT, INSPECT + "ListCalls"])
async def test_requests_without_the_api_key_are_refused(
    api: Api, headers: dict[str, str], path: str
) -> None:
    body = dispatch_pb2.DispatchRequest(calls=[echo("x", api.endpoint)]).SerializeToString()
    status, ctype, reply = await api.post(path, body, headers | PROTO)
    assert (status, ctype) == (401, "application/json")
    error = json.loads(reply)
    assert error["code"] == "unauthenticated"
    assert "API key" in error["message"]
    assert api.endpoint.received == []


@pytest.mark.parametrize(
    ("function", "url", "words"),
    [
        ("has-dash", "<ep>", "calls[1].function 'has-dash' is not a valid function name"),
        ("f", "bridge://x", "calls[1].endpoint 'bridge://x' is not supported"),
        ("f", "http://", "calls[1].endpoint 'http://' has no host"),
        ("f", "", "calls[1].endpoint is missing"),
        ("", "<ep>", "calls[1].function is missing"),
    ],
)
async def test_invalid_calls_are_rejected_and_nothing_is_dispatched(
    api: Api, function: str, url: str, words: str
) -> None:
    bad = call_pb2.Call(function=function, endpoint=url.replace("<ep>", api.endpoint.url))
    req = dispatch_pb2.DispatchRequest(calls=[echo("first", api.endpoint), bad])
    status, ctype, reply = await api.post(DISPATCH, req.SerializeToString(), AUTH | PROTO)
    assert (status, ctype) == (400, "application/json")
    error = json.loads(reply)
    assert error["code"] == "invalid_argument"
    assert words in error["message"]
    listed = await api.rpc(
        INSPECT + "ListCalls", inspect_pb2.ListCallsRequest(), inspect_pb2.ListCallsResponse()
    )
    assert list(listed.calls) == []
    await asyncio.sleep(0.05)
    assert api.endpoint.received == []


async def test_negative_expiration_is_rejected(api: Api) -> None:
    bad = echo("x", api.endpoint)
    bad.expiration.seconds = -5
    req = dispatch_pb2.DispatchRequest(calls=[bad])
    status, _, reply = await api.post(DISPATCH, req.SerializeToString(), AUTH | PROTO)
    assert status == 400
    assert "calls[0].expiration must not be negative, got -5 s" in json.loads(reply)["message"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"\xff\xff", PROTO, 400, "invalid_argument"),
        (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_argument"),
        (b"x", {"Content-Type": "text/plain"}, 415, "invalid_argument"),
    ],
)
async def test_undecodable_requests_are_connect_errors(
    api: Api, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    got, ctype, reply = await api.post(DISPATCH, body, AUTH | headers)
    assert (got, ctype) == (status, "application/json")
    assert json.loads(reply)["code"] == code


async def test_unknown_rpc_is_a_connect_error(api: Api) -> None:
    status, ctype, reply = await api.post("/dispatch.sdk.v1.DispatchService/Nope", b"", AUTH)
    assert (status, ctype) == (404, "application/json")
    assert json.loads(reply)["code"] == "unimplemented"


async def test_wait_returns_the_final_call_result(api: Api) -> None:
    api.endpoint.on("boom", lambda req: fail(status_pb2.STATUS_PERMANENT_ERROR, "bad", "KeyError"))
    [good, bad] = await api.dispatch(
        echo("w", api.endpoint), call("boom", endpoint=api.endpoint.url)
    )
    result = await api.wait(good)
    assert (unpack_text(result.output), result.dispatch_id) == ("w!", good)
    failed = await api.wait(bad)
    assert (failed.error.type, failed.error.message) == ("KeyError", "bad")
    status, ctype, reply = await api.post(WAIT, "no-such-id", AUTH)
    assert (status, ctype) == (404, "application/json")
    assert json.loads(reply)["code"] == "not_found"


async def tree_setup(api: Api) -> tuple[str, str]:
    """A parent with two children (one failing) and one top-level sibling."""
    api.endpoint.on("bad", lambda req: fail(status_pb2.STATUS_PERMANENT_ERROR, "nope"))

    def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        if not resumed(req):
            return poll([call("echo", "a", 1), call("bad", "b", 2)], min_results=2)
        return ok("parent done")

    api.endpoint.on("parent", parent)
    [root, other] = await api.dispatch(
        call("parent", "p", endpoint=api.endpoint.url), echo("solo", api.endpoint)
    )
    await api.wait(root)
    await api.wait(other)
    return root, other


async def test_list_calls_filters(api: Api) -> None:
    root, other = await tree_setup(api)

    async def listed(**kw: Any) -> list[inspect_pb2.CallInfo]:
        req = inspect_pb2.ListCallsRequest(**kw)
        resp = await api.rpc(INSPECT + "ListCalls", req, inspect_pb2.ListCallsResponse())
        return list(resp.calls)

    everything = await listed()
    assert len(everything) == 4
    assert [c.dispatch_id for c in await listed(top_level_only=True)] == [root, other]
    assert {c.function for c in await listed(root_dispatch_id=root)} == {"parent", "echo", "bad"}
    [failed] = await listed(statuses=[status_pb2.STATUS_PERMANENT_ERROR])
    assert (failed.function, failed.parent_dispatch_id) == ("bad", root)
    assert failed.result.error.message == "nope"
    assert len(await listed(states=[inspect_pb2.CALL_STATE_DONE])) == 4
    assert await listed(states=[inspect_pb2.CALL_STATE_PENDING]) == []
    slim = await listed(omit_payloads=True, top_level_only=True)
    assert not slim[0].HasField("input")
    assert not slim[0].HasField("result")
    assert slim[0].child_count == 2


async def test_list_calls_pages(api: Api) -> None:
    ids = await api.dispatch(*(echo(str(i), api.endpoint) for i in range(5)))
    for dispatch_id in ids:
        await api.wait(dispatch_id)
    seen: list[str] = []
    token = ""
    while True:
        req = inspect_pb2.ListCallsRequest(limit=2, page_token=token)
        resp = await api.rpc(INSPECT + "ListCalls", req, inspect_pb2.ListCallsResponse())
        seen.extend(c.dispatch_id for c in resp.calls)
        token = resp.next_page_token
        if not token:
            break
    assert seen == ids


async def test_list_calls_over_json(api: Api) -> None:
    root, _ = await tree_setup(api)
    reply = await api.rpc_json(INSPECT + "ListCalls", {"topLevelOnly": True, "limit": 1})
    [info] = reply["calls"]
    assert info["dispatchId"] == root
    assert info["state"] == "CALL_STATE_DONE"
    assert info["status"] == "STATUS_OK"
    assert info["result"]["output"]["value"] == "parent done"
    assert info["input"]["@type"].endswith("google.protobuf.StringValue")
    assert reply["nextPageToken"]


async def test_get_call_returns_the_tree(api: Api) -> None:
    root, _ = await tree_setup(api)
    req = inspect_pb2.GetCallRequest(dispatch_id=root)
    resp = await api.rpc(INSPECT + "GetCall", req, inspect_pb2.GetCallResponse())
    tree = resp.tree
    assert tree.call.dispatch_id == root
    assert tree.call.state == inspect_pb2.CALL_STATE_DONE
    assert tree.call.polls == 1
    assert tree.call.attempts == 2
    assert tree.call.HasField("finish_time")
    assert tree.call.child_count == 2
    kids = {k.call.function: k.call for k in tree.children}
    assert set(kids) == {"echo", "bad"}
    assert kids["echo"].correlation_id == 1
    assert unpack_text(kids["echo"].result.output) == "a!"
    assert kids["bad"].status == status_pb2.STATUS_PERMANENT_ERROR
    assert kids["bad"].result.error.message == "nope"
    assert kids["bad"].root_dispatch_id == root
    # A child's own tree, and a depth limit.
    sub = await api.rpc(
        INSPECT + "GetCall",
        inspect_pb2.GetCallRequest(dispatch_id=kids["bad"].dispatch_id),
        inspect_pb2.GetCallResponse(),
    )
    assert sub.tree.call.function == "bad"
    shallow = await api.rpc(
        INSPECT + "GetCall",
        inspect_pb2.GetCallRequest(dispatch_id=root, max_depth=1),
        inspect_pb2.GetCallResponse(),
    )
    assert len(shallow.tree.children) == 2
    missing = inspect_pb2.GetCallRequest(dispatch_id="nope").SerializeToString()
    status, _, reply = await api.post(INSPECT + "GetCall", missing, AUTH | PROTO)
    assert (status, json.loads(reply)["code"]) == (404, "not_found")


async def test_get_call_over_json_renders_unknown_values(api: Api) -> None:
    c = call("echo", endpoint=api.endpoint.url)
    c.input.type_url = "example.com/private.Type"
    c.input.value = b"\x01\x02"
    api.endpoint.on("echo", lambda req: ok("fine"))
    [dispatch_id] = await api.dispatch(c)
    await api.wait(dispatch_id)
    reply = await api.rpc_json(INSPECT + "GetCall", {"dispatchId": dispatch_id})
    value = reply["tree"]["call"]["input"]
    assert value["@type"].endswith("dispatch_aio.v1.OpaqueValue")
    assert value["typeUrl"] == "example.com/private.Type"
    # Binary responses keep the original Any.
    resp = await api.rpc(
        INSPECT + "GetCall",
        inspect_pb2.GetCallRequest(dispatch_id=dispatch_id),
        inspect_pb2.GetCallResponse(),
    )
    assert resp.tree.call.input == c.input


async def test_wait_call_waits_or_times_out(api: Api) -> None:
    release = asyncio.Event()

    async def slow(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
        await release.wait()
        return ok("late")

    api.endpoint.on("slow", slow)
    [dispatch_id] = await api.dispatch(call("slow", endpoint=api.endpoint.url))
    req = inspect_pb2.WaitCallRequest(dispatch_id=dispatch_id)
    req.timeout.FromMilliseconds(100)
    resp = await api.rpc(INSPECT + "WaitCall", req, inspect_pb2.WaitCallResponse())
    assert resp.call.state == inspect_pb2.CALL_STATE_RUNNING
    waiting = asyncio.ensure_future(
        api.rpc_json(INSPECT + "WaitCall", json_format.MessageToDict(req) | {"timeout": "10s"})
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    reply = await waiting
    assert reply["call"]["state"] == "CALL_STATE_DONE"
    assert reply["call"]["result"]["output"]["value"] == "late"
