"""A `CallRecord` as a row of the calls table: the same columns in every SQL store.

The stores differ in their SQL dialect, not in what they keep; one list of columns and
one mapping each way keep them from drifting apart when the record gains a field.
"""

from __future__ import annotations

__all__ = [
    "CALL_COLUMNS",
    "MUTABLE_AT",
    "MUTABLE_COLUMNS",
    "call_from_row",
    "call_params",
    "signed",
    "unsigned",
]

from collections.abc import Callable, Sequence
from typing import Any

from ._interface import CallRecord, Phase, StateKind

CALL_COLUMNS: tuple[str, ...] = CallRecord._fields
"""Column order of a call after its ``seq``, shared by inserts, updates and reads: the
record's own fields, so that a record is the row of its values, in order."""

_FIXED = frozenset({"id", "root_id", "parent_id", "correlation_id", "parent_generation"})
_FIXED |= {"created_at", "expires_at"}
MUTABLE_COLUMNS = tuple(c for c in CALL_COLUMNS if c not in _FIXED)
"""The columns an update writes: all but the call's identity and its creation."""
MUTABLE_AT = tuple(CALL_COLUMNS.index(c) for c in MUTABLE_COLUMNS)
"""Where each mutable column sits in a record, and in `call_params`."""


def signed(value: int) -> int:
    """Map a uint64 to the int64 a SQL integer holds (and back with `unsigned`)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned(value: int) -> int:
    """Map back what `signed` stored."""
    return value + (1 << 64) if value < 0 else value


def call_params(r: CallRecord, text: Callable[[str], str] = str) -> tuple[Any, ...]:
    """Return the values of `CALL_COLUMNS`; `text` adapts free-form strings to the store."""
    return (
        r.id,
        r.root_id,
        r.parent_id,
        signed(r.correlation_id),
        r.parent_generation,
        text(r.endpoint),
        text(r.function),
        r.input,
        text(r.version),
        r.created_at,
        r.expires_at,
        int(r.phase),
        r.updated_at,
        r.generation,
        r.due_at,
        int(r.state_kind),
        r.state,
        r.min_results,
        r.max_results,
        r.poll_error,
        r.attempts,
        r.failures,
        r.polls,
        r.status,
        text(r.last_error),
        r.result,
        r.finished_at,
        r.divergences,
        r.policy,
        text(r.trace_context),
    )


def call_from_row(row: Sequence[Any]) -> tuple[int, CallRecord]:
    """Return the ``seq`` and the record of a row ``SELECT seq, <CALL_COLUMNS>``."""
    return row[0], CallRecord(
        id=row[1],
        root_id=row[2],
        parent_id=row[3],
        correlation_id=unsigned(row[4]),
        parent_generation=row[5],
        endpoint=row[6],
        function=row[7],
        input=row[8],
        version=row[9],
        created_at=row[10],
        expires_at=row[11],
        phase=Phase(row[12]),
        updated_at=row[13],
        generation=row[14],
        due_at=row[15],
        state_kind=StateKind(row[16]),
        state=row[17],
        min_results=row[18],
        max_results=row[19],
        poll_error=row[20],
        attempts=row[21],
        failures=row[22],
        polls=row[23],
        status=row[24],
        last_error=row[25],
        result=row[26],
        finished_at=row[27],
        divergences=row[28],
        policy=bytes(row[29]),
        trace_context=row[30],
    )
