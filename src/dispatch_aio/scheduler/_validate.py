"""Validation of calls submitted to the scheduler (API requests, Poll calls, tail calls).

The rules are those of the Dispatch protocol: a function name matching
``^[a-zA-Z_][a-zA-Z0-9_<>.]*$``, an http(s) endpoint (the local scheduler calls no
other kind) and a non-negative expiration. Names and URLs are bounded in length
(`MAX_FUNCTION_NAME`, `MAX_ENDPOINT`), so that a call that could never run is refused
when it is submitted, not when it is run. Each problem is reported as one sentence that
names the field and what to do.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ..proto.sdk.v1 import call_pb2

__all__ = [
    "FUNCTION_NAME_PATTERN",
    "MAX_ENDPOINT",
    "MAX_FUNCTION_NAME",
    "call_problem",
    "endpoint_problem",
]

FUNCTION_NAME_PATTERN = r"^[a-zA-Z_][a-zA-Z0-9_<>.]*$"
MAX_FUNCTION_NAME = 512
"""Characters a function name may have."""
MAX_ENDPOINT = 2048
"""Characters an endpoint URL may have."""
_FUNCTION_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_<>.]*")


def endpoint_problem(endpoint: str) -> str | None:
    """Return why `endpoint` cannot be called by this scheduler, or None if it can."""
    if len(endpoint) > MAX_ENDPOINT:
        return f"is {len(endpoint)} characters long, over the limit of {MAX_ENDPOINT}"
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return (
            "is not supported: the local scheduler calls http:// and https:// endpoints only "
            "(bridge:// and AWS Lambda endpoints need the hosted Dispatch service)"
        )
    if not host:
        return "has no host: give a URL such as http://127.0.0.1:8000"
    if parts.query or parts.fragment:
        return "must not have a query or a fragment"
    return None


def call_problem(call: call_pb2.Call, where: str, *, default_endpoint: str = "") -> str | None:
    """Return what is wrong with a call, or None if it can be dispatched.

    Args:
        call: The call to check.
        where: How to name the call in the message, e.g. ``"calls[3]"``.
        default_endpoint: The endpoint used when the call has none (empty: the call
            must name one).
    """
    if not call.function:
        return f"{where}.function is missing: give the name of the function to call"
    if len(call.function) > MAX_FUNCTION_NAME:
        return (
            f"{where}.function {call.function[:40]!r}... is {len(call.function)} characters "
            f"long, over the limit of {MAX_FUNCTION_NAME}"
        )
    if not _FUNCTION_NAME.fullmatch(call.function):
        return (
            f"{where}.function {call.function!r} is not a valid function name: "
            f"it must match {FUNCTION_NAME_PATTERN}"
        )
    endpoint = call.endpoint or default_endpoint
    if not endpoint:
        return (
            f"{where}.endpoint is missing: give the URL of the endpoint that serves "
            f"{call.function!r} (for example http://127.0.0.1:8000)"
        )
    problem = endpoint_problem(endpoint)
    if problem is not None:
        return f"{where}.endpoint {endpoint!r} {problem}"
    if call.HasField("expiration"):
        exp = call.expiration
        if exp.seconds < 0 or exp.nanos < 0:
            seconds = exp.seconds + exp.nanos / 1e9
            return f"{where}.expiration must not be negative, got {seconds:g} s"
    return None
