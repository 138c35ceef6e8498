"""Durable events inside functions: ``value = await dispatch_aio.wait_event(key)``."""

from __future__ import annotations

__all__ = ["wait_event"]

import math
import sys
from typing import Any

from ._codec import encode_value
from ._reserved import WAIT_EVENT, event_key_problem
from .durable import durable_call, in_durable_function


async def wait_event(key: str, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - a durable, scheduler-side timeout
    """Wait, durably, until the event `key` is resolved; return its value.

    The function suspends: while it waits it costs one stored row in the scheduler and
    nothing else, and it keeps waiting across restarts of the scheduler and of the
    application. Resolve the event from anywhere with
    ``await dispatch.client.send_event(key, value)`` (or ``error=exc``), or with
    ``dispatch-aio send-event KEY VALUE``. An event is resolved once; a function that
    waits on a key resolved already gets its value at once. Several functions may wait
    on one key: each receives the value.

    This needs dispatch_aio's scheduler (embedded, ``dispatch-aio run`` or
    ``dispatch-aio server``); with another Dispatch scheduler the await raises
    `dispatch_aio.errors.PermanentError` saying so.

    Args:
        key: Names the event: 1 to 256 printable characters, e.g. ``f"approval-{order}"``.
        timeout: Seconds to wait at most, counted by the scheduler from the moment the
            function suspends; None waits as long as the call may live (7 days by
            default, see ``default_expiration``).

    Returns:
        The value sent with the event.

    Raises:
        TimeoutError: The event was not resolved within `timeout`
            (`dispatch_aio.errors.DispatchTimeoutError`). Replays raise it at the same
            point.
        Exception: The error the event was resolved with (``send_event(key, error=...)``).
        ValueError: The key or timeout is invalid.
        RuntimeError: Called outside a function run by Dispatch.
    """
    if not isinstance(key, str):
        raise TypeError(f"wait_event() takes the key as a str, got {type(key).__name__}")
    problem = event_key_problem(key)
    if problem is not None:
        raise ValueError(f"wait_event(): {problem}")
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(
            f"wait_event(): timeout must be a positive number of seconds, got {timeout!r}"
        )
    if not in_durable_function():
        raise RuntimeError(
            "wait_event() waits durably, so it works only inside a function run by Dispatch "
            "(registered with @dispatch.function and called through the scheduler)"
        )
    frame = sys._getframe(1)
    site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return await durable_call(
        WAIT_EVENT, encode_value(key), call_site=site, expiration=timeout or 0.0
    )
