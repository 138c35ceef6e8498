"""The generated protocol messages match the Dispatch wire format."""

from google.protobuf import wrappers_pb2

from dispatch_aio.proto.sdk.python.v1 import pickled_pb2
from dispatch_aio.proto.sdk.v1 import (
    call_pb2,
    dispatch_pb2,
    function_pb2,
    poll_pb2,
    status_pb2,
)

# RunRequest{function:"greet", input: Any(StringValue "World")}, PROTOCOL.md §4.3.
GREET_REQUEST = bytes.fromhex(
    "0a056772656574123a0a2f747970652e676f6f676c65617069732e636f6d2f676f6f676c652e"
    "70726f746f6275662e537472696e6756616c756512070a05576f726c64"
)


def test_decode_greet_run_request() -> None:
    assert len(GREET_REQUEST) == 67
    req = function_pb2.RunRequest.FromString(GREET_REQUEST)
    assert req.function == "greet"
    assert req.WhichOneof("directive") == "input"
    assert req.input.type_url == "type.googleapis.com/google.protobuf.StringValue"
    value = wrappers_pb2.StringValue()
    assert req.input.Unpack(value)
    assert value.value == "World"
    assert req.dispatch_id == ""
    assert req.parent_dispatch_id == ""
    assert req.root_dispatch_id == ""
    assert not req.HasField("creation_time")
    assert not req.HasField("expiration_time")
    assert req.SerializeToString() == GREET_REQUEST


def _fields(message: type) -> dict[str, tuple[int, int]]:
    desc = message.DESCRIPTOR  # type: ignore[attr-defined]
    return {f.name: (f.number, f.type) for f in desc.fields}


def test_field_numbers() -> None:
    t = call_pb2.Call.DESCRIPTOR.fields_by_name["correlation_id"]
    assert t.type == t.TYPE_UINT64
    assert {k: v[0] for k, v in _fields(call_pb2.Call).items()} == {
        "correlation_id": 1,
        "endpoint": 2,
        "function": 3,
        "input": 4,
        "expiration": 5,
        "version": 6,
        "policy": 1000,  # dispatch_aio's extension, skipped by other schedulers
        "trace_context": 1001,  # dispatch_aio's extension
    }
    assert {k: v[0] for k, v in _fields(call_pb2.CallResult).items()} == {
        "correlation_id": 1,
        "output": 2,
        "error": 3,
        "dispatch_id": 4,
    }
    assert {k: v[0] for k, v in _fields(poll_pb2.Poll).items()} == {
        "coroutine_state": 1,
        "calls": 2,
        "max_wait": 3,
        "max_results": 4,
        "min_results": 5,
        "typed_coroutine_state": 6,
        "abandoned_calls": 1000,  # dispatch_aio's extension
    }
    assert {k: v[0] for k, v in _fields(poll_pb2.PollResult).items()} == {
        "coroutine_state": 1,
        "results": 2,
        "error": 3,
        "typed_coroutine_state": 4,
    }
    assert {k: v[0] for k, v in _fields(function_pb2.RunRequest).items()} == {
        "function": 1,
        "input": 2,
        "poll_result": 3,
        "dispatch_id": 4,
        "parent_dispatch_id": 5,
        "root_dispatch_id": 6,
        "creation_time": 7,
        "expiration_time": 8,
        "generation": 1000,  # dispatch_aio's extension
        "trace_context": 1001,  # dispatch_aio's extension
    }
    assert {k: v[0] for k, v in _fields(function_pb2.RunResponse).items()} == {
        "status": 1,
        "exit": 2,
        "poll": 3,
    }
    assert {k: v[0] for k, v in _fields(dispatch_pb2.DispatchResponse).items()} == {
        "dispatch_ids": 1
    }
    assert pickled_pb2.Pickled.DESCRIPTOR.full_name == "dispatch.sdk.python.v1.Pickled"


def test_oneofs() -> None:
    poll = poll_pb2.Poll.DESCRIPTOR.oneofs_by_name["state"]
    assert [f.name for f in poll.fields] == ["coroutine_state", "typed_coroutine_state"]
    res = poll_pb2.PollResult.DESCRIPTOR.oneofs_by_name["state"]
    assert [f.name for f in res.fields] == ["coroutine_state", "typed_coroutine_state"]
    run = function_pb2.RunRequest.DESCRIPTOR.oneofs_by_name["directive"]
    assert [f.name for f in run.fields] == ["input", "poll_result"]
    out = function_pb2.RunResponse.DESCRIPTOR.oneofs_by_name["directive"]
    assert [f.name for f in out.fields] == ["exit", "poll"]


def test_status_values() -> None:
    names = {v.name: v.number for v in status_pb2.Status.DESCRIPTOR.values}
    assert names == {
        "STATUS_UNSPECIFIED": 0,
        "STATUS_OK": 1,
        "STATUS_TIMEOUT": 2,
        "STATUS_THROTTLED": 3,
        "STATUS_INVALID_ARGUMENT": 4,
        "STATUS_INVALID_RESPONSE": 5,
        "STATUS_TEMPORARY_ERROR": 6,
        "STATUS_PERMANENT_ERROR": 7,
        "STATUS_INCOMPATIBLE_STATE": 8,
        "STATUS_DNS_ERROR": 9,
        "STATUS_TCP_ERROR": 10,
        "STATUS_TLS_ERROR": 11,
        "STATUS_HTTP_ERROR": 12,
        "STATUS_UNAUTHENTICATED": 13,
        "STATUS_PERMISSION_DENIED": 14,
        "STATUS_NOT_FOUND": 15,
    }


def test_services() -> None:
    svc = function_pb2.DESCRIPTOR.services_by_name["FunctionService"]
    assert svc.full_name == "dispatch.sdk.v1.FunctionService"
    assert svc.methods_by_name["Run"].input_type.full_name == "dispatch.sdk.v1.RunRequest"
    api = dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"]
    assert api.methods_by_name["Dispatch"].output_type.full_name == (
        "dispatch.sdk.v1.DispatchResponse"
    )
