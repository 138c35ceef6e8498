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

__all__ = [
    "JOURNAL_TYPE_URL",
    "JOURNAL_VERSION",
    "IncompatibleState",
    "decode_state",
    "pack_state",
    "peek_run_id",
]

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


_RUN_ID_FIELD = 4


def peek_run_id(state: bytes) -> bytes | None:
    """Return the run id of serialized journal bytes without parsing the whole journal.

    The first Poll writes the header fields first, so the run id comes within
    the first few top-level fields; this keeps a live-cache hit O(1) in the
    length of the journal. Returns None when the bytes do not look like that.
    """
    pos, end = 0, len(state)
    for _ in range(8):
        tag, pos = _varint(state, pos)
        if tag < 0:
            return None
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(state, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(state, pos)
            if length < 0 or pos + length > end:
                return None
            if field == _RUN_ID_FIELD:
                return state[pos : pos + length]
            pos += length
        else:
            return None
        if pos < 0 or pos > end:
            return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a protobuf varint at ``pos``; (-1, -1) when truncated or too long."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, -1
