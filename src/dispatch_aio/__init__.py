"""dispatch_aio: asyncio-native durable functions for the Dispatch protocol.

The public API is what `__all__` lists, plus the modules `dispatch_aio.errors` (the
exception hierarchy) and `dispatch_aio.http` (HTTP helpers for functions).
"""

__version__ = "0.1.0"

from . import errors, http
from ._client import Call, Client
from ._dispatch import Batch, Dispatch
from ._endpoint import EndpointServer
from ._function import Function
from ._status import Status
from .durable import get_logger, in_durable_function, now, random, run_on_host, uuid4

__all__ = [
    "Batch",
    "Call",
    "Client",
    "Dispatch",
    "EndpointServer",
    "Function",
    "Status",
    "__version__",
    "errors",
    "get_logger",
    "http",
    "in_durable_function",
    "now",
    "random",
    "run_on_host",
    "uuid4",
]
