"""Where the scheduler keeps its state: the `Store` interface and its two implementations.

`SQLiteStore` keeps everything in one file on this machine (the default);
`PostgresStore` keeps it in a PostgreSQL database (the ``postgres`` extra). Both map
calls to rows the same way (`_rows`) and pass the same contract tests.
"""

from ._interface import (
    WRITE_ALONE,
    AddAttempt,
    AddResult,
    AppendSegment,
    AttemptRecord,
    CallQuery,
    CallRecord,
    InsertCall,
    Op,
    Phase,
    PruneIdempotencyKeys,
    PutIdempotencyKey,
    QueuedResult,
    RemovePollerResults,
    RemoveResults,
    RemoveSegments,
    SetMeta,
    Snapshot,
    StateKind,
    Store,
    StoreError,
    UpdateCall,
)
from ._postgres import PostgresStore
from ._sqlite import SQLiteStore

__all__ = [
    "WRITE_ALONE",
    "AddAttempt",
    "AddResult",
    "AppendSegment",
    "AttemptRecord",
    "CallQuery",
    "CallRecord",
    "InsertCall",
    "Op",
    "Phase",
    "PostgresStore",
    "PruneIdempotencyKeys",
    "PutIdempotencyKey",
    "QueuedResult",
    "RemovePollerResults",
    "RemoveResults",
    "RemoveSegments",
    "SQLiteStore",
    "SetMeta",
    "Snapshot",
    "StateKind",
    "Store",
    "StoreError",
    "UpdateCall",
]
