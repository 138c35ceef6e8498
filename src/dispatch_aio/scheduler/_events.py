"""Durable events on the scheduler side: waiters are calls the scheduler answers itself.

A function that awaits ``dispatch_aio.wait_event(key)`` makes a call to the reserved
function `WAIT_EVENT` whose input is the key (a string). The engine never sends a Run
request for such a call: it keeps it as a stored row and an entry of `EventWaiters`,
with no timer but the one of its expiration, which is the wait's timeout. The event
is resolved once (`Engine.send_event`): its outcome is stored under the key, and the
calls waiting on it finish with that outcome in the same transaction. A waiter made
after the resolution finds the outcome in the store and finishes at once. A waiter
that expires first finishes with STATUS_TIMEOUT, which its caller receives as a
``TimeoutError``.
"""

from __future__ import annotations

__all__ = [
    "MAX_EVENT_KEY_LENGTH",
    "WAIT_EVENT",
    "EventAlreadyResolvedError",
    "EventWaiters",
    "event_key",
    "event_key_problem",
    "event_timeout_result",
]

from collections.abc import Hashable
from typing import Generic, TypeVar

from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import DecodeError

from .._reserved import MAX_EVENT_KEY_LENGTH, WAIT_EVENT, event_key_problem
from .._status import Status
from ..proto.sdk.v1 import call_pb2, error_pb2
from .store import CallRecord

_STRING_URL = "type.googleapis.com/" + wrappers_pb2.StringValue.DESCRIPTOR.full_name

_W = TypeVar("_W", bound=Hashable)


class EventAlreadyResolvedError(ValueError):
    """The event's key was resolved already; an event is resolved once."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the event {key!r} is already resolved: an event is resolved once, and its "
            "waiters received the first value; use a new key for a new event"
        )
        self.key = key


def event_key(rec: CallRecord) -> str | None:
    """The key a call waits on, or None if it is not an event wait ("" if unreadable)."""
    if rec.function != WAIT_EVENT:
        return None
    try:
        value = any_pb2.Any.FromString(rec.input)
        if value.type_url != _STRING_URL:
            return ""
        return wrappers_pb2.StringValue.FromString(value.value).value
    except DecodeError:
        return ""


def event_timeout_result(key: str, rec: CallRecord) -> call_pb2.CallResult:
    """The result of a wait that timed out: a STATUS_TIMEOUT error (a ``TimeoutError``)."""
    seconds = rec.expires_at - rec.created_at
    message = f"the event {key!r} was not sent within {seconds:.6g} s"
    return call_pb2.CallResult(
        error=error_pb2.Error(type=Status.TIMEOUT.proto_name, message=message)
    )


class EventWaiters(Generic[_W]):
    """The calls waiting on each event key, and the keys to look up in the store."""

    __slots__ = ("_by_key", "_unchecked")

    def __init__(self) -> None:
        self._by_key: dict[str, dict[_W, None]] = {}
        self._unchecked: dict[str, None] = {}

    def add(self, key: str, waiter: _W) -> bool:
        """Register a waiter; True if it is new (its key then needs a look-up)."""
        waiters = self._by_key.setdefault(key, {})
        if waiter in waiters:
            return False
        waiters[waiter] = None
        self._unchecked[key] = None
        return True

    def discard(self, key: str, waiter: _W) -> None:
        """Forget a waiter (it finished)."""
        waiters = self._by_key.get(key)
        if waiters is not None:
            waiters.pop(waiter, None)
            if not waiters:
                del self._by_key[key]

    def waiting(self, key: str) -> list[_W]:
        """The waiters of a key, oldest first."""
        return list(self._by_key.get(key, ()))

    def take_unchecked(self) -> list[str]:
        """Return and forget the keys whose new waiters need a look-up in the store."""
        keys = [key for key in self._unchecked if key in self._by_key]
        self._unchecked.clear()
        return keys

    def recheck(self, keys: list[str]) -> None:
        """Look these keys up again (the last look-up failed)."""
        self._unchecked.update(dict.fromkeys(keys))

    def keys(self) -> list[str]:
        """The keys waited on."""
        return list(self._by_key)

    @property
    def unchecked(self) -> bool:
        """Whether some keys wait for a look-up."""
        return bool(self._unchecked)

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_key.values())
