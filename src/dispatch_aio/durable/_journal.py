"""The journal: the coroutine state of a durable function, and how it is (de)serialized.

The journal travels in ``Poll.typed_coroutine_state`` and comes back in
``PollResult``. It is written incrementally: each Poll appends the encoding of
a Journal holding only what is new, which protobuf parses as a merge, so a
suspension costs what changed rather than the whole history.
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError as ProtoDecodeError

from ..proto.sdk.v1 import poll_pb2
from ..proto.v1 import journal_pb2

__all__ = ["JOURNAL_TYPE_URL", "JOURNAL_VERSION", "IncompatibleState", "decode_state", "pack_state"]

JOURNAL_VERSION = 1
JOURNAL_TYPE_URL = "type.googleapis.com/" + journal_pb2.Journal.DESCRIPTOR.full_name


class IncompatibleState(Exception):
    """The state of a resume request cannot be used; the call must restart from its input."""


def pack_state(journal: bytes) -> any_pb2.Any:
    """Wrap serialized journal bytes as the typed coroutine state."""
    return any_pb2.Any(type_url=JOURNAL_TYPE_URL, value=journal)


def decode_state(result: poll_pb2.PollResult, function: str) -> tuple[journal_pb2.Journal, bytes]:
    """Return the journal carried by a PollResult and its serialized bytes.

    Raises:
        IncompatibleState: The state is missing, legacy, foreign, corrupt, of an
            unknown version, or belongs to another function.
    """
    kind = result.WhichOneof("state")
    if kind is None:
        raise IncompatibleState("the resume request carries no coroutine state")
    if kind == "coroutine_state":
        raise IncompatibleState(
            "the resume request carries a legacy bytes coroutine_state, which dispatch_aio "
            "never writes"
        )
    state = result.typed_coroutine_state
    if state.type_url.rsplit("/", 1)[-1] != journal_pb2.Journal.DESCRIPTOR.full_name:
        raise IncompatibleState(
            f"the coroutine state has type {state.type_url!r}, not a dispatch_aio journal; "
            "it was written by another SDK"
        )
    try:
        journal = journal_pb2.Journal.FromString(state.value)
    except ProtoDecodeError as exc:
        raise IncompatibleState(f"the coroutine state is corrupt: {exc}") from None
    if journal.version != JOURNAL_VERSION:
        raise IncompatibleState(
            f"the journal has format version {journal.version}; this version of "
            f"dispatch_aio reads version {JOURNAL_VERSION}"
        )
    if journal.function != function:
        raise IncompatibleState(
            f"the journal belongs to function {journal.function!r}, not {function!r}"
        )
    if len(journal.run_id) != 16:
        raise IncompatibleState("the journal has no valid run id")
    return journal, state.value
