"""How scheduler replicas share one store: partitions, leases and wake-ups.

Call trees are spread over `PARTITIONS` partitions by a hash of their root's dispatch
id (`partition_of`): every call of a tree, and every result its calls exchange, stays in
one partition. A replica drives the calls of the partitions it holds a lease on, and
only those. A lease is a row ``(partition, owner, epoch, expires_at)``: its holder
renews it, and another replica may take it once it expired, which increments the epoch.
Every write that drives a call carries a `Fence` with the epoch its replica knows, so
that a replica which lost a lease cannot commit anything for its partition.

Replicas wake each other through the store (PostgreSQL: LISTEN/NOTIFY): new calls in a
partition (`Announce`), calls that finished (for callers waiting on another replica),
cancellations to carry out, and leases let go.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._interface import CallRecord, Snapshot

__all__ = ["PARTITIONS", "Coordination", "Handlers", "Leases", "partition_of"]

PARTITIONS = 64
"""Number of partitions call trees are spread over (fixed: it is part of the schema)."""


def partition_of(root_id: str) -> int:
    """Return the partition of the call tree whose root has dispatch id `root_id`.

    The first 32 bits of the MD5 digest of the id's UTF-8 bytes, modulo `PARTITIONS`:
    PostgreSQL computes the same (``dispatch_calls.partition``).
    """
    digest = hashlib.md5(root_id.encode("utf-8", "replace"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % PARTITIONS


@dataclass(frozen=True, slots=True)
class Leases:
    """What a replica holds after renewing its leases."""

    held: dict[int, int]
    """Epoch of each partition held."""
    share: int
    """Partitions a replica may hold while the live replicas share them evenly."""
    replicas: int
    """Live replicas, this one included."""
    next_expiry: float | None = None
    """Seconds until the first lease held by another replica expires (None: none is
    held): if that replica stopped renewing, its partitions may be taken then."""


@dataclass(frozen=True, slots=True)
class Handlers:
    """What a replica does when another one wakes it (called on the event loop)."""

    calls: Callable[[int, list[str]], None]
    """New calls in a partition (partition, dispatch ids)."""
    done: Callable[[list[str]], None]
    """Calls that finished."""
    cancel: Callable[[str], None]
    """A cancellation asked of the replica that drives the call."""
    leases: Callable[[], None]
    """A replica let leases go: they may be taken now."""
    reconnected: Callable[[], None]
    """Wake-ups may have been missed (the store connected again): look again."""
    event: Callable[[str], None]
    """A durable event was resolved (its key): its waiters here may finish."""
    schedules: Callable[[], None]
    """Another replica created, changed or deleted a schedule."""
    slots: Callable[[str], None]
    """A replica gave back a concurrency slot of this function."""


class Coordination(abc.ABC):
    """The leases, loads by partition and wake-ups of replicas sharing a store."""

    @property
    @abc.abstractmethod
    def replica(self) -> str:
        """This replica's name in the lease rows (unique among replicas)."""

    @abc.abstractmethod
    async def start(self, handlers: Handlers, lease_timeout: float) -> None:
        """Listen for wake-ups and join the live replicas.

        Raises:
            StoreError: The store cannot be reached.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Let every lease go, leave the live replicas and stop listening."""

    @abc.abstractmethod
    async def renew(self) -> Leases:
        """Renew the leases held, and take free or expired ones up to the fair share.

        Raises:
            StoreError: The store cannot be reached; nothing is known of the leases.
        """

    @abc.abstractmethod
    async def claim(self, partitions: Sequence[int]) -> dict[int, int]:
        """Start driving partitions held: give each a new epoch; return those still held.

        The new epoch is given once the writes fenced with the old one have ended, so
        that a load made afterwards sees all of them, and none of them commits later.

        Raises:
            StoreError: The store cannot be reached.
        """

    @abc.abstractmethod
    async def release(self, partitions: Sequence[int]) -> None:
        """Let leases go, for other replicas to take at once."""

    @abc.abstractmethod
    async def load(self, partitions: Sequence[int]) -> Snapshot:
        """Return the unfinished calls of `partitions` and their queued results.

        `Snapshot.next_seq` is above the seq of every result returned.
        """

    @abc.abstractmethod
    async def get_calls(self, dispatch_ids: Sequence[str]) -> list[CallRecord]:
        """Return the calls among `dispatch_ids` that exist."""

    @abc.abstractmethod
    async def request_cancel(self, dispatch_id: str) -> None:
        """Ask the replica driving a call to cancel it."""

    @abc.abstractmethod
    async def take_slot(self, function: str, limit: int, held: Sequence[int]) -> int | None:
        """Take one of the `limit` concurrency slots `function` has across the replicas.

        A slot is held by this replica's connection: it is freed when given back, or
        when the replica dies (its connection ends). Returns the slot's number, or None
        when all are held (`held`: those this replica holds).

        Raises:
            StoreError: The store cannot be reached.
        """

    @abc.abstractmethod
    async def give_slot(self, function: str, slot: int) -> None:
        """Give back a slot `take_slot` took, and wake the replicas waiting for one."""

    @abc.abstractmethod
    async def replicas(self) -> dict[str, int]:
        """Return the live replicas and how many partitions each holds (to monitor)."""
