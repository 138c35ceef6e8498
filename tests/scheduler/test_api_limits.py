"""The API refuses oversized requests with a clear 4xx answer, never a 500."""

from __future__ import annotations

import json

from dispatch_aio.proto.sdk.v1 import dispatch_pb2
from dispatch_aio.proto.v1 import inspect_pb2
from dispatch_aio.scheduler._api import MAX_CALLS_PER_REQUEST

from .test_api import AUTH, DISPATCH, INSPECT, PROTO, Api, api, echo

__all__ = ["api"]


def connect_error(status: int, body: bytes) -> tuple[int, str, str]:
    error = json.loads(body)
    return status, error["code"], error["message"]


async def test_too_many_calls_in_one_request_are_refused_whole(api: Api) -> None:
    calls = [echo(str(i), api.endpoint) for i in range(MAX_CALLS_PER_REQUEST + 1)]
    body = dispatch_pb2.DispatchRequest(calls=calls).SerializeToString()
    status, _, reply = await api.post(DISPATCH, body, AUTH | PROTO)
    status, code, message = connect_error(status, reply)
    assert (status, code) == (413, "resource_exhausted")
    assert f"limit of {MAX_CALLS_PER_REQUEST}" in message and "several requests" in message
    listed = await api.rpc(
        INSPECT + "ListCalls", inspect_pb2.ListCallsRequest(), inspect_pb2.ListCallsResponse()
    )
    assert not listed.calls  # nothing of the batch was taken


async def test_a_function_name_too_long_is_refused_at_submission(api: Api) -> None:
    call = echo("x", api.endpoint)
    call.function = "f" * 100_000
    body = dispatch_pb2.DispatchRequest(calls=[call]).SerializeToString()
    status, code, message = connect_error(*(await api.post(DISPATCH, body, AUTH | PROTO))[::2])
    assert (status, code) == (400, "invalid_argument")
    assert "100000 characters long, over the limit of 512" in message
    assert len(message) < 300


async def test_an_endpoint_url_too_long_is_refused(api: Api) -> None:
    call = echo("x", api.endpoint)
    call.endpoint = api.endpoint.url + "/" + "p" * 5000
    body = dispatch_pb2.DispatchRequest(calls=[call]).SerializeToString()
    status, code, message = connect_error(*(await api.post(DISPATCH, body, AUTH | PROTO))[::2])
    assert (status, code) == (400, "invalid_argument")
    assert "over the limit of 2048" in message


async def test_bad_page_tokens_are_400(api: Api) -> None:
    for token in ("1" * 40, "-1", "²", "abc", " 1"):
        request = inspect_pb2.ListCallsRequest(page_token=token).SerializeToString()
        status, _, reply = await api.post(INSPECT + "ListCalls", request, AUTH | PROTO)
        assert connect_error(status, reply)[:2] == (400, "invalid_argument"), token
