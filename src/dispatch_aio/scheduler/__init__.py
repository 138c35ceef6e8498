"""The local Dispatch scheduler: runs Dispatch calls on one machine, durably.

`Scheduler` serves ``DispatchService.Dispatch`` (plus dispatch-py's test-only ``Wait``
RPC and an inspection service, ``dispatch_aio.v1.InspectService``), calls function
endpoints with signed ``Run`` requests, and implements the Poll semantics of the
protocol: child calls, per-poller result queues, ``min_results``/``max_results``/
``max_wait``, tail calls, retries with backoff and restart on INCOMPATIBLE_STATE.
Every accepted call and state change is committed to its store (SQLite by default,
or PostgreSQL with `PostgresStore`) before it is acknowledged or acted on, and a
restarted scheduler picks up every unfinished call. Several schedulers (replicas) may
share one PostgreSQL database: each drives the call trees of the partitions it holds a
lease on, and the others take a dead replica's partitions over once its leases expire.

Calls that set no expiration may run for `DEFAULT_EXPIRATION` seconds (7 days); an
expired call fails with STATUS_TIMEOUT. A child call never outlives its parent's
expiration.
"""

from ._engine import DEFAULT_EXPIRATION, RetryPolicy
from ._scheduler import Scheduler
from .store import PostgresStore, SQLiteStore, Store, StoreError, StoreInUseError

__all__ = [
    "DEFAULT_EXPIRATION",
    "PostgresStore",
    "RetryPolicy",
    "SQLiteStore",
    "Scheduler",
    "Store",
    "StoreError",
    "StoreInUseError",
]
