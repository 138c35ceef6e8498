"""Durable calls to functions served by another endpoint, and to dispatch-py functions.

A registered function's durable call leaves ``Call.endpoint`` empty, which the protocol
reads as "this application". `call_at` names the endpoint instead: to reach a function of
another application, or a scheduler that does not fill in the caller's endpoint.

dispatch-py (the earlier Python SDK of the protocol) functions accept one input form only:
``Pickled(dispatch.proto.Arguments(args, kwargs))``, a pickle of dispatch-py's own
dataclass (anything else fails with "input does not hold arguments"). `dispatch_py_input`
writes that pickle without importing dispatch-py, and `call_dispatch_py` calls such a
function durably.
"""

from __future__ import annotations

__all__ = ["call_at", "call_dispatch_py", "dispatch_py_input"]

import pickle
import sys
from collections.abc import Coroutine, Mapping
from typing import Any

from google.protobuf import any_pb2

from ._codec import PICKLED_TYPE_URL, encode_input
from ._function import check_function_name
from .durable import durable_call
from .proto.sdk.python.v1 import pickled_pb2

_ENDPOINT_SCHEMES = ("http://", "https://", "bridge://")

# The state is pickled with protocol 3: from protocol 4 on, a pickle is cut into frames,
# and the opcodes around it could not be added without rewriting the frame headers.
_STATE_PROTOCOL = 3
# The opcodes that build a ``dispatch.proto.Arguments`` the way a dataclass instance
# pickles itself (``copyreg.__newobj__`` then its ``__dict__``), with the class named by
# GLOBAL, so that unpickling imports it and never needs it here:
# PROTO 3, GLOBAL 'dispatch.proto Arguments', EMPTY_TUPLE, NEWOBJ ... then the state
# dict, BUILD and STOP.
_HEAD = b"\x80\x03cdispatch.proto\nArguments\n)\x81"
_TAIL = b"b."


def dispatch_py_input(
    args: tuple[object, ...] = (), kwargs: Mapping[str, object] | None = None
) -> any_pb2.Any:
    """Encode arguments as the input of a dispatch-py function.

    Args:
        args: The positional arguments.
        kwargs: The keyword arguments.

    Returns:
        ``Pickled(dispatch.proto.Arguments(args, kwargs))`` as dispatch-py writes it. The
        arguments are pickled with the standard `pickle`, as dispatch-py does (it has no
        cloudpickle to load values pickled by value), so classes and functions among them
        must be importable by the receiving application.

    Raises:
        TypeError: An argument cannot be pickled.
    """
    state = {"args": tuple(args), "kwargs": dict(kwargs or {})}
    try:
        body = pickle.dumps(state, protocol=_STATE_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"cannot encode the arguments of a dispatch-py function: {type(exc).__name__}: "
            f"{exc}; pass only values that pickle by reference (importable classes and "
            "functions, no lambdas, locks or open files)"
        ) from exc
    # Keep the state's opcodes: drop its PROTO header (2 bytes) and its STOP (1 byte).
    pickled = _HEAD + body[2:-1] + _TAIL
    return any_pb2.Any(
        type_url=PICKLED_TYPE_URL,
        value=pickled_pb2.Pickled(pickled_value=pickled).SerializeToString(),
    )


def call_at(
    endpoint: str, function: str, /, *args: object, **kwargs: object
) -> Coroutine[Any, Any, Any]:
    """Call a function served at `endpoint` durably, from inside a durable function.

    The arguments are encoded as for a registered function's calls, which dispatch_aio
    functions (and, for a single primitive argument, other SDKs' functions) can read.

    Args:
        endpoint: URL of the application serving the function.
        function: The function's name there.
        *args: Positional arguments.
        **kwargs: Keyword arguments.

    Returns:
        A coroutine that returns the function's result, or raises its error.

    Raises:
        ValueError: The endpoint or function name is invalid.
        TypeError: An argument cannot be encoded.
        RuntimeError: Called outside a durable function.
    """
    _check(endpoint, function)
    input = encode_input(args, kwargs, function=function)
    return durable_call(function, input, call_site=_caller(), endpoint=endpoint)


def call_dispatch_py(
    endpoint: str, function: str, /, *args: object, **kwargs: object
) -> Coroutine[Any, Any, Any]:
    """Call a dispatch-py function durably, from inside a durable function.

    ::

        total = await call_dispatch_py("http://127.0.0.1:8001", "add", 1, b=2)

    Args:
        endpoint: URL of the dispatch-py application serving the function.
        function: The function's name there (its ``__qualname__``).
        *args: Positional arguments.
        **kwargs: Keyword arguments.

    Returns:
        A coroutine that returns the function's result, or raises its error.

    Raises:
        ValueError: The endpoint or function name is invalid.
        TypeError: An argument cannot be pickled.
        RuntimeError: Called outside a durable function.
    """
    _check(endpoint, function)
    input = dispatch_py_input(args, kwargs)
    return durable_call(function, input, call_site=_caller(), endpoint=endpoint)


def _check(endpoint: str, function: str) -> None:
    check_function_name(function)
    if not endpoint.startswith(_ENDPOINT_SCHEMES):
        raise ValueError(
            f"invalid endpoint {endpoint!r} for a call to {function!r}: use the http:// or "
            "https:// URL of the application serving it"
        )


def _caller() -> str:
    """The file:line that called the public function calling this one."""
    frame = sys._getframe(2)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
