"""Where the scheduler keeps its state: the `Store` interface and its two implementations.

`SQLiteStore` keeps everything in one file on this machine (the default);
`PostgresStore` keeps it in a PostgreSQL database (the ``postgres`` extra). Both map
calls to rows the same way (`_rows`) and pass the same contract tests.
"""

from ._coordination import PARTITIONS, Coordination, Handlers, Leases, partition_of
from ._interface import (
    WRITE_ALONE,
    AddResult,
    Announce,
    AppendSegment,
    CallQuery,
    CallRecord,
    Fence,
    FencedError,
    InsertCall,
    KeyTakenError,
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
    "PARTITIONS",
    "WRITE_ALONE",
    "AddResult",
    "Announce",
    "AppendSegment",
    "CallQuery",
    "CallRecord",
    "Coordination",
    "Fence",
    "FencedError",
    "Handlers",
    "InsertCall",
    "KeyTakenError",
    "Leases",
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
    "partition_of",
]
