"""_interop: dispatch-py's Arguments input, and durable calls that name their endpoint.

That dispatch-py itself loads this input and runs the calls is checked against the real
dispatch-py in tests/interop/.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
import threading
import types
from collections.abc import AsyncIterator

import aiohttp
import pytest
from endpoint_driver import Driver

from dispatch_aio import Dispatch
from dispatch_aio._codec import (
    PICKLED_TYPE_URL,
    decode_input,
    decode_value,
    encode_input,
    encode_value,
)
from dispatch_aio.interop import call_at, call_dispatch_py, dispatch_py_input
from dispatch_aio.proto.sdk.python.v1 import pickled_pb2
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2, poll_pb2

PEER = "http://peer.example:8001"


def test_the_input_is_a_pickle_of_dispatch_proto_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stand-in for dispatch-py's dataclass, at the module path its pickle names.
    @dataclasses.dataclass
    class Arguments:
        args: tuple[object, ...]
        kwargs: dict[str, object]

    proto = types.ModuleType("dispatch.proto")
    proto.Arguments = Arguments  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dispatch", types.ModuleType("dispatch"))
    monkeypatch.setitem(sys.modules, "dispatch.proto", proto)

    value = dispatch_py_input((1, [2, 3]), {"name": "x"})
    assert value.type_url == PICKLED_TYPE_URL
    loaded = pickle.loads(pickled_pb2.Pickled.FromString(value.value).pickled_value)
    assert type(loaded) is Arguments
    assert loaded == Arguments((1, [2, 3]), {"name": "x"})


def test_our_decoder_reads_it_without_dispatch_py() -> None:
    assert "dispatch" not in sys.modules
    assert decode_input(dispatch_py_input()) == ((), {})
    assert decode_input(dispatch_py_input(("a",), {"k": (1, 2)})) == (("a",), {"k": (1, 2)})


def test_an_argument_that_does_not_pickle_is_refused_here() -> None:
    with pytest.raises(TypeError, match=r"arguments of a dispatch-py function.*no lambdas"):
        dispatch_py_input((threading.Lock(),))
    # Stored by reference only, as dispatch-py can load it: no cloudpickle by value.
    with pytest.raises(TypeError, match=r"arguments of a dispatch-py function"):
        dispatch_py_input((lambda x: x,))


@pytest.mark.parametrize("make", [call_at, call_dispatch_py])
def test_bad_calls_fail_where_they_are_made(make: object) -> None:
    with pytest.raises(ValueError, match=r"invalid endpoint 'peer:8001' for a call to 'f'"):
        make("peer:8001", "f")  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"invalid function name 'has-dash'"):
        make(PEER, "has-dash")  # type: ignore[operator]
    with pytest.raises(RuntimeError, match=r"outside a durable function"):
        make(PEER, "f", 1)  # type: ignore[operator]


@pytest.fixture
async def driver() -> AsyncIterator[Driver]:
    dispatch = Dispatch(env={}, endpoint_addr="127.0.0.1:0", api_url="http://127.0.0.1:9")

    @dispatch.function(name="relay")
    async def relay(x: int) -> list[object]:
        return [
            await call_dispatch_py(PEER, "double", x, factor=2),
            await call_at(PEER, "triple", x),
        ]

    async with await dispatch.start() as server, aiohttp.ClientSession() as session:
        yield Driver(session, server.url)


def resume(
    response: function_pb2.RunResponse, call: call_pb2.Call, value: object
) -> function_pb2.RunRequest:
    result = call_pb2.CallResult(correlation_id=call.correlation_id, output=encode_value(value))
    return function_pb2.RunRequest(
        function="relay",
        dispatch_id="1",
        poll_result=poll_pb2.PollResult(
            typed_coroutine_state=response.poll.typed_coroutine_state, results=[result]
        ),
    )


async def test_calls_name_the_endpoint_and_carry_the_input_of_their_kind(
    driver: Driver,
) -> None:
    request = function_pb2.RunRequest(
        function="relay", dispatch_id="1", input=encode_input((5,), {})
    )
    first = await driver.send(request)
    (call,) = first.poll.calls
    assert (call.endpoint, call.function) == (PEER, "double")
    assert call.input == dispatch_py_input((5,), {"factor": 2})

    second = await driver.send(resume(first, call, 20))
    (call,) = second.poll.calls
    assert (call.endpoint, call.function) == (PEER, "triple")
    assert call.input == encode_input((5,), {})

    done = await driver.send(resume(second, call, 15))
    assert decode_value(done.exit.result.output) == [20, 15]
