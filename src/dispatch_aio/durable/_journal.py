"""The journal: the coroutine state of a durable function, and how it is (de)serialized.

The journal travels in ``Poll.typed_coroutine_state`` and comes back in
``PollResult``. It is written incrementally: each Poll appends the encoding of
a Journal holding only what is new (a segment), which protobuf parses as a
merge, so the journal is the concatenation of its segments.

With a scheduler of this SDK that announces the journal extension (the
``Dispatch-Aio-Journal: delta`` header, see ``JournalDelta`` in journal.proto),
a Poll carries only the new segment, as a ``JournalDelta``; the scheduler
keeps the segments and resumes with a ``JournalRef``, which the live cache
continues. When the cache no longer holds the run, the answer is the
``JOURNAL_NEEDED`` signal and the scheduler sends the whole journal again.

Such a scheduler marks the resume of a call being cancelled with the
``Dispatch-Aio-Cancel: 1`` header: the runner then raises ``CancelledError``
at the function's pending await and answers with how it ended.
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError as ProtoDecodeError

from ..proto.sdk.v1 import poll_pb2
from ..proto.v1 import journal_pb2

__all__ = [
    "CANCEL_HEADER",
    "JOURNAL_DELTA_TYPE_URL",
    "JOURNAL_HEADER",
    "JOURNAL_NEEDED",
    "JOURNAL_REF_TYPE_URL",
    "JOURNAL_TYPE_URL",
    "JOURNAL_VERSION",
    "IncompatibleState",
    "JournalNeeded",
    "decode_state",
    "journal_ref",
    "pack_delta",
    "pack_state",
    "peek_run_id",
]

JOURNAL_VERSION = 1
JOURNAL_TYPE_URL = "type.googleapis.com/" + journal_pb2.Journal.DESCRIPTOR.full_name
JOURNAL_DELTA_TYPE_URL = "type.googleapis.com/" + journal_pb2.JournalDelta.DESCRIPTOR.full_name
JOURNAL_REF_TYPE_URL = "type.googleapis.com/" + journal_pb2.JournalRef.DESCRIPTOR.full_name
JOURNAL_HEADER = "Dispatch-Aio-Journal"
"""HTTP header by which a scheduler announces the journal extension (value ``delta``)."""
CANCEL_HEADER = "Dispatch-Aio-Cancel"
"""HTTP header (value ``1``) by which a scheduler resumes a call it cancels."""
JOURNAL_NEEDED = "dispatch_aio.JournalNeeded"
"""Error type of the answer to a JournalRef the live cache cannot continue."""


class IncompatibleState(Exception):
    """The state of a resume request cannot be used; the call must restart from its input."""


class JournalNeeded(Exception):
    """A resume names its journal by a JournalRef, and the live cache cannot continue it."""


def pack_state(journal: bytes) -> any_pb2.Any:
    """Wrap serialized journal bytes as the typed coroutine state."""
    return any_pb2.Any(type_url=JOURNAL_TYPE_URL, value=journal)


def pack_delta(delta: journal_pb2.JournalDelta) -> any_pb2.Any:
    """Wrap a JournalDelta as the typed coroutine state."""
    return any_pb2.Any(type_url=JOURNAL_DELTA_TYPE_URL, value=delta.SerializeToString())


def journal_ref(result: poll_pb2.PollResult) -> journal_pb2.JournalRef | None:
    """Return the JournalRef a PollResult carries as its state, or None for any other state.

    Raises:
        IncompatibleState: The JournalRef is corrupt.
    """
    if result.WhichOneof("state") != "typed_coroutine_state":
        return None
    state = result.typed_coroutine_state
    if state.type_url != JOURNAL_REF_TYPE_URL:
        return None
    try:
        return journal_pb2.JournalRef.FromString(state.value)
    except ProtoDecodeError as exc:
        raise IncompatibleState(f"the journal reference is corrupt: {exc}") from None


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
    if state.type_url == JOURNAL_DELTA_TYPE_URL:
        raise IncompatibleState(
            "the coroutine state is a JournalDelta: the scheduler echoed a delta it should "
            "have kept (it announced the journal extension without supporting it)"
        )
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
