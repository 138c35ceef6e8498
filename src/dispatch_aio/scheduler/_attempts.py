"""Attempts in words: what each Run attempt of a call did, as `show` lists it.

The engine records one `AttemptRecord` per attempt with the change the attempt made
to its call; the invoker describes network failures here so that they read as what
happened (a refused connection while the app was down) rather than as exceptions.
"""

from __future__ import annotations

__all__ = ["connection_failure", "describe_attempt", "record_attempt"]

import errno
from typing import TYPE_CHECKING

import aiohttp

from .._status import Status
from .store import AddAttempt, AttemptRecord

if TYPE_CHECKING:
    from ._invoker import Outcome


def connection_failure(exc: aiohttp.ClientConnectionError) -> str:
    """Describe a failure to connect or to keep a connection, in one readable line."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{exc.host}:{exc.port}"
        code = exc.os_error.errno if exc.os_error is not None else None
        if code == errno.ECONNREFUSED:
            return (
                f"connection refused by {where}: nothing listens there (the app was not "
                "running, or serves another address)"
            )
        reason = exc.os_error.strerror if exc.os_error is not None else None
        return f"cannot connect to {where}: {reason or exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the app closed the connection before answering (did it stop or crash?)"
    text = str(exc)
    return f"connection error: {type(exc).__name__}" + (f": {text}" if text else "")


def describe_attempt(outcome: Outcome) -> str:
    """Return what an attempt did, in words ("suspended", "ok", the error ...)."""
    response = outcome.response
    if response is None:
        return outcome.error or outcome.status.name
    directive = response.WhichOneof("directive")
    if directive == "poll" and outcome.status in (Status.OK, Status.UNSPECIFIED):
        calls = len(response.poll.calls)
        return "suspended" + (f", made {calls} call{'s' * (calls != 1)}" if calls else "")
    if directive == "exit" and response.exit.HasField("tail_call"):
        return f"tail call to {response.exit.tail_call.function}"
    if directive == "exit" and outcome.status is Status.OK:
        return "ok"
    text = outcome.status.name.lower()
    if directive == "exit" and response.exit.result.HasField("error"):
        error = response.exit.result.error
        message = error.message.partition("\nRaised in the remote function:")[0]
        text += f": {error.type}: {message}" if error.type else f": {message}"
    return text


def record_attempt(
    call_id: str, number: int, started_at: float, finished_at: float, outcome: Outcome
) -> AddAttempt:
    """Return the write that records an attempt."""
    status = outcome.status
    if status is Status.UNSPECIFIED and outcome.response is not None:
        status = Status.OK  # a Poll without a status: the run suspended
    return AddAttempt(
        AttemptRecord(
            call_id=call_id,
            number=number,
            started_at=started_at,
            finished_at=finished_at,
            status=int(status),
            outcome=describe_attempt(outcome),
        )
    )
