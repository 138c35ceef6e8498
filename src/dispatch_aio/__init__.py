"""dispatch_aio: asyncio-native durable functions for the Dispatch protocol.

The public API is what `__all__` lists, including the modules `dispatch_aio.errors` (the
exception hierarchy), `dispatch_aio.http` (HTTP helpers for functions) and
`dispatch_aio.interop` (calls to other endpoints and to dispatch-py functions), plus
`dispatch_aio.testing` (the test environment).
"""

__version__ = "0.1.0"

from . import errors, http, interop
from ._client import Call, Client
from ._dispatch import Batch, Dispatch
from ._endpoint import EndpointServer
from ._events import wait_event
from ._function import Function
from ._policy import FunctionPolicy, RateLimit, RetryPolicy
from ._schedule_client import Schedule
from ._status import Status
from .durable import (
    deprecate_patch,
    get_logger,
    in_durable_function,
    now,
    patched,
    random,
    run_on_host,
    uuid4,
)

__all__ = [
    "Batch",
    "Call",
    "Client",
    "Dispatch",
    "EndpointServer",
    "Function",
    "FunctionPolicy",
    "RateLimit",
    "RetryPolicy",
    "Schedule",
    "Status",
    "__version__",
    "deprecate_patch",
    "errors",
    "get_logger",
    "http",
    "in_durable_function",
    "interop",
    "now",
    "patched",
    "random",
    "run_on_host",
    "uuid4",
    "wait_event",
]
