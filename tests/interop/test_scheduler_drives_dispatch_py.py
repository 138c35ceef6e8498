"""Scenario 1: our scheduler drives a dispatch-py application.

The application (peers/app.py) runs dispatch-py's own endpoint and coroutine scheduler and
verifies our scheduler's request signatures (DISPATCH_VERIFICATION_KEY). Calls are
submitted to our scheduler with dispatch-py's input form, pickled dispatch.proto.Arguments.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio._codec import encode_input
from dispatch_aio.interop import dispatch_py_input
from dispatch_aio.proto.sdk.v1 import call_pb2, function_pb2
from dispatch_aio.scheduler import RetryPolicy, Scheduler

from .harness import API_KEY, DispatchPyApp, outcome, run_call

pytestmark = pytest.mark.timeout(300)  # the first test may create the virtualenv


def call(app: DispatchPyApp, function: str, *args: object, **kwargs: object) -> call_pb2.Call:
    return call_pb2.Call(function=function, endpoint=app.url, input=dispatch_py_input(args, kwargs))


async def test_sequential_awaits_gather_and_plain_functions_complete(
    scheduler: Scheduler, dispatch_py_app: DispatchPyApp
) -> None:
    app = dispatch_py_app
    sequential, fan_out, add = await asyncio.gather(
        run_call(scheduler, call(app, "sequential", 5), peer=app.peer),
        run_call(scheduler, call(app, "fan_out", [1, 2, 3, 4]), peer=app.peer),
        run_call(scheduler, call(app, "add", 2, 40), peer=app.peer),
    )
    # sequential(5) awaits double(i), then add(total, doubled), for i < 5, then
    # scale(total, factor=10): 10 * 2 * (0+1+2+3+4).
    assert outcome(sequential) == 200
    # dispatch-py sends lists of numbers as google.protobuf.Value: the ints become floats.
    assert outcome(fan_out) == [2.0, 4.0, 6.0, 8.0]
    assert outcome(add) == 42


async def test_errors_travel_between_dispatch_py_functions_and_to_us(
    scheduler: Scheduler, dispatch_py_app: DispatchPyApp
) -> None:
    app = dispatch_py_app
    # Our own input encoding (a bare int) is not Arguments, which dispatch-py requires.
    ours = call_pb2.Call(function="double", endpoint=app.url, input=encode_input((3,), {}))
    failed, recovered, poll_error, not_arguments = await asyncio.gather(
        run_call(scheduler, call(app, "fail", "boom"), peer=app.peer),
        run_call(scheduler, call(app, "recover", "bang"), peer=app.peer),
        run_call(scheduler, call(app, "bad_call"), peer=app.peer),
        run_call(scheduler, ours, peer=app.peer),
    )
    assert failed.error.type == "ValueError"
    with pytest.raises(ValueError) as raised:
        outcome(failed)
    assert str(raised.value) == "boom"
    assert outcome(recovered) == "recovered from bang"
    # We refuse a Poll's invalid call with PollResult.error; dispatch-py raises it in the
    # coroutine that made the call.
    message = outcome(poll_error)
    assert isinstance(message, str)
    assert message.startswith("poll error RuntimeError: the Poll's calls were not dispatched")
    assert "'has-dash' is not a valid function name" in message
    assert (not_arguments.error.type, not_arguments.error.message) == (
        "RuntimeError",
        "input does not hold arguments",
    )


async def test_dispatch_py_reset_is_run_as_a_tail_call(
    scheduler: Scheduler, dispatch_py_app: DispatchPyApp
) -> None:
    # dispatch-py answers Reset with exit{tail_call}, no result, status TEMPORARY_ERROR;
    # we honour the tail call whatever the status (its own test scheduler retries it).
    result = await run_call(scheduler, call(dispatch_py_app, "restart", 21))
    assert outcome(result) == 42


async def test_dispatch_py_rejects_requests_we_did_not_sign(
    dispatch_py_app: DispatchPyApp,
) -> None:
    """The verification is real: another key's signature and no signature are refused."""
    other = Scheduler(
        ":memory:",
        api_key=API_KEY,
        signing_key=Ed25519PrivateKey.generate(),
        retry=RetryPolicy(max_attempts=1),
    )
    async with other:
        result = await run_call(other, call(dispatch_py_app, "double", 1))
    assert result.error.type == "STATUS_PERMISSION_DENIED", result
    assert "HTTP 403" in result.error.message, result

    request = function_pb2.RunRequest(function="double", input=dispatch_py_input((1,)))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            dispatch_py_app.url + "/dispatch.sdk.v1.FunctionService/Run",
            data=request.SerializeToString(),
            headers={"Content-Type": "application/proto"},
        ) as response,
    ):
        # 403 permission_denied, in a body that is not JSON: dispatch-py builds it with an
        # f-string and the message has quotes in it.
        assert response.status == 403
        assert "Signature-Input" in await response.text()
