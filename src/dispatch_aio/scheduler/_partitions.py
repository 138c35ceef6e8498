"""The engine's share of the work when several scheduler replicas use one store.

`Partitions` keeps the leases of the replica (see `store.Coordination`): it renews them
every third of the lease timeout, takes free or expired partitions up to its fair share,
lets go of partitions above it (after the attempts in flight there finish), and tells
the engine what to drive: on gaining a partition the engine loads its unfinished calls,
on losing one it drops them from memory at once (the store fences its writes anyway).

It also carries the wake-ups between replicas: calls submitted to another replica,
callers waiting here for a call driven elsewhere, and cancellations of such calls.
"""

from __future__ import annotations

__all__ = ["Moved", "Partitions", "announce"]

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from ..proto.sdk.v1 import call_pb2
from ._failures import log_failure
from .store import (
    PARTITIONS,
    Announce,
    CallQuery,
    CallRecord,
    Coordination,
    Fence,
    FencedError,
    Handlers,
    Op,
    Phase,
    RemoveResults,
    StoreError,
    partition_of,
)

if TYPE_CHECKING:
    from ._engine import Engine, _Live

logger = logging.getLogger("dispatch_aio.scheduler")

_SLOT_RECHECK = 1.0  # seconds between looks for a slot a dead replica freed

_ENDED_KEPT = 65536  # calls remembered as finished here (see `Partitions.adoptable`)
_TAKE_SLACK = 0.05  # seconds after another replica's lease expires to renew ours


class Moved(Exception):
    """The call's partition went to another replica while a caller waited for it here."""


class Partitions:
    """Leases, loads and wake-ups of one replica; the engine calls its hooks.

    Args:
        engine: The engine it feeds.
        coordination: The store's coordination of replicas.
        lease_timeout: Seconds after which a lease not renewed may be taken over.
    """

    def __init__(self, engine: Engine, coordination: Coordination, lease_timeout: float) -> None:
        self._engine = engine
        self._coord = coordination
        self._lease = lease_timeout
        self._interval = lease_timeout / 3
        self.owned: dict[int, int] = {}
        """Epoch of each partition held."""
        self.draining: set[int] = set()
        """Partitions being let go: no attempt starts there."""
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewed_at = 0.0  # event-loop time of the last renewal that succeeded
        self._next_expiry: float | None = None  # event-loop time another's lease expires
        self._failing = False
        # Calls finished here lately: a load or announcement read before they finished
        # must not bring them back (insertion-ordered, the oldest forgotten first).
        self._ended: dict[str, None] = {}
        self.submitting: set[str] = set()
        """Calls being submitted here: taken in once their write returns."""
        # Attempts waiting for a concurrency slot another replica holds, by function.
        self._slot_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._slots: dict[str, set[int]] = {}  # the slots this replica holds, by function
        self._slot_lock = asyncio.Lock()  # one take at a time: it reads `_slots`

    @property
    def replica(self) -> str:
        """This replica's name in the lease rows."""
        return self._coord.replica

    async def start(self) -> None:
        """Join the replicas, take a first share of the partitions and keep them.

        Raises:
            StoreError: The store cannot be reached.
        """
        handlers = Handlers(
            calls=self._announced,
            done=self._done,
            cancel=self._cancel_asked,
            leases=self._wake.set,
            reconnected=self._reconnected,
            event=self._engine._event_resolved,
            schedules=self._schedules_changed,
            slots=self._slot_freed,
        )
        await self._coord.start(handlers, self._lease)
        await self._round(first=True)
        self._keeper = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        """Stop renewing and let every lease go (the engine has stopped its attempts)."""
        tasks = [t for t in (self._keeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keeper = None
        self.owned.clear()
        from ._engine import EngineClosedError  # the engine module imports this one

        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(EngineClosedError("the scheduler is shutting down"))
                    future.exception()  # not logged if its waiter returned meanwhile
        await self._coord.stop()

    # Hooks of the engine.

    def holds(self, root_id: str) -> bool:
        """Whether this replica drives the call tree of `root_id` now."""
        partition = partition_of(root_id)
        return partition in self.owned and partition not in self.draining

    def fence(self, root_id: str) -> list[Op]:
        """Return the fence of a write that drives a call of the tree of `root_id`.

        Raises:
            FencedError: This replica does not hold the tree's partition.
        """
        partition = partition_of(root_id)
        epoch = self.owned.get(partition)
        if epoch is None:
            raise FencedError(f"this replica no longer holds partition {partition}")
        return [Fence(partition, self._coord.replica, epoch)]

    def fenced(self, live: _Live) -> None:
        """A write for `live` was fenced off: its partition is someone else's now."""
        partition = partition_of(live.rec.root_id)
        logger.warning(
            "partition %d went to another replica (a write was fenced off); "
            "its calls are dropped here",
            partition,
        )
        self.drop([partition])
        self._wake.set()

    def adoptable(self, dispatch_id: str) -> bool:
        """Whether a call read from the store may be taken in: not live, not just ended."""
        return dispatch_id not in self._engine._live and dispatch_id not in self._ended

    def ended(self, dispatch_id: str) -> None:
        """Remember that a call finished here (see `adoptable`)."""
        self._ended[dispatch_id] = None
        if len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]

    def seq(self, counter: int, root_id: str) -> int:
        """Return the seq of a result from the engine's counter: its partition modulo 64."""
        return counter * PARTITIONS + partition_of(root_id)

    async def wait(self, dispatch_id: str, max_seconds: float | None) -> CallRecord | None:
        """Wait for a call that this replica does not drive to finish."""
        store = self._engine._store
        loop = asyncio.get_running_loop()
        deadline = None if max_seconds is None else loop.time() + max_seconds
        while True:
            future = self._waiter(dispatch_id)
            try:
                rec = await store.get_call(dispatch_id)
                if rec is None or rec.phase is Phase.DONE:
                    return rec
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return rec
                try:
                    async with asyncio.timeout(left):
                        await future
                except TimeoutError:
                    return await store.get_call(dispatch_id)
            finally:
                self._forget(dispatch_id, future)

    async def cancel(self, dispatch_id: str) -> int | None:
        """Have the replica driving a call cancel it; return the calls stopped.

        Raises:
            LookupError: No call has this id.
            StoreError: No replica carried the cancellation out in time.
        """
        engine = self._engine
        store = engine._store
        rec = await store.get_call(dispatch_id)
        if rec is None:
            raise LookupError(f"no call with dispatch id {dispatch_id!r}")
        if rec.phase is Phase.DONE:
            return None
        tree = [r for _, r in await store.list_calls(CallQuery(root_id=rec.root_id))]
        below = _unfinished_below(dispatch_id, tree)
        limit = engine.settings.cancel_grace + 3 * self._lease
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            future = self._waiter(dispatch_id)
            try:
                await self._coord.request_cancel(dispatch_id)
                try:
                    async with asyncio.timeout(max(min(self._lease, deadline - loop.time()), 0)):
                        await future
                except TimeoutError:
                    pass
                rec = await store.get_call(dispatch_id)
            finally:
                self._forget(dispatch_id, future)
            if rec is None or rec.phase is Phase.DONE:
                return below
            if loop.time() >= deadline:
                raise StoreError(
                    f"no scheduler replica carried out the cancellation of {dispatch_id} "
                    f"within {limit:g} s (the replica holding its partition may be down): "
                    "cancel it again"
                )

    # Leases.

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._interval
            if self.owned:  # wake up in time to stop before the leases may expire
                wait = max(min(wait, self._renewed_at + self._valid() - loop.time()), 0.0)
            if self._next_expiry is not None:  # and to take a dead replica's at once
                wait = max(min(wait, self._next_expiry + _TAKE_SLACK - loop.time()), 0.0)
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._round()
            except Exception as exc:
                log_failure(logger, exc, "the lease round failed")

    def _valid(self) -> float:
        # Seconds after a renewal's start during which the leases are surely still ours:
        # stop driving calls a little before another replica may take them.
        return self._lease - self._interval / 2

    async def _round(self, *, first: bool = False) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            leases = await self._coord.renew()
        except StoreError as exc:
            if first:
                raise
            if not self._failing:
                self._failing = True
                logger.warning("cannot renew the leases: %s", exc)
            if self.owned and loop.time() >= self._renewed_at + self._valid():
                logger.warning(
                    "the leases of %d partitions may have expired: their calls are "
                    "dropped here until the database is back",
                    len(self.owned),
                )
                self.drop(list(self.owned))
            return
        if self._failing:
            self._failing = False
            logger.warning("leases renewed again")
        self._renewed_at = started
        expiry = leases.next_expiry
        self._next_expiry = None if expiry is None else started + expiry
        held = leases.held
        lost = [p for p, epoch in self.owned.items() if held.get(p) != epoch]
        if lost:
            logger.warning("partitions %s went to another replica", _ranges(lost))
            self.drop(lost)
        gained = {p: epoch for p, epoch in held.items() if p not in self.owned}
        if gained:
            logger.info(
                "holding partitions %s (%d live replicas)", _ranges(gained), leases.replicas
            )
            await self._gain(gained)
        extra = len(held) - leases.share
        if extra > 0 and leases.replicas > 1:
            spare = sorted(held)[-extra:]
            logger.info("letting partitions %s go to the other replicas", _ranges(spare))
            await self._drain(spare)
            await self._coord.release(spare)

    async def _gain(self, gained: dict[int, int]) -> None:
        """Take partitions: load their unfinished calls and carry on with them."""
        engine = self._engine
        # A new epoch first: a write of ours still in flight from an earlier hold of the
        # partition (dropped when renewals failed) ends before the load, or is fenced.
        gained = await self._coord.claim(list(gained))
        self.owned.update(gained)
        try:
            snapshot = await self._coord.load(list(gained))
        except StoreError:
            for p in gained:
                self.owned.pop(p, None)
            raise
        engine._seq = max(engine._seq, snapshot.next_seq // PARTITIONS + 1)
        fresh: dict[str, _Live] = {}
        for rec in snapshot.calls:
            if self.adoptable(rec.id) and partition_of(rec.root_id) in self.owned:
                fresh[rec.id] = engine._new_live(rec)
        stale: dict[str, list[int]] = {}
        for queued in snapshot.results:
            poller = fresh.get(queued.poller_id)
            if poller is not None and poller.rec.generation == queued.generation:
                poller.queue.append((queued.seq, call_pb2.CallResult.FromString(queued.result)))
            elif queued.poller_id not in engine._live:
                stale.setdefault(queued.poller_id, []).append(queued.seq)
        if fresh:
            logger.info("picking up %d unfinished calls", len(fresh))
        for live in fresh.values():
            engine._live[live.rec.id] = live
        for live in fresh.values():
            engine._arm(live)
        if stale:
            await self._remove_stale(stale)

    async def _remove_stale(self, stale: dict[str, list[int]]) -> None:
        by_partition: dict[int, list[int]] = {}
        records = await self._coord.get_calls(list(stale))
        roots = {rec.id: rec.root_id for rec in records}
        for poller, seqs in stale.items():
            if poller in roots:
                by_partition.setdefault(partition_of(roots[poller]), []).extend(seqs)
        for partition, seqs in by_partition.items():
            epoch = self.owned.get(partition)
            if epoch is None:
                continue
            fence = Fence(partition, self._coord.replica, epoch)
            try:
                await self._engine._store.write([fence, RemoveResults(tuple(seqs))])
            except StoreError as exc:
                logger.info("could not remove results of finished calls: %s", exc)

    def drop(self, partitions: Iterable[int]) -> None:
        """Stop driving the calls of `partitions` at once (their leases are gone)."""
        engine = self._engine
        gone = set(partitions)
        for p in gone:
            self.owned.pop(p, None)
        current = asyncio.current_task()
        for live in list(engine._live.values()):
            if partition_of(live.rec.root_id) not in gone:
                continue
            live.cancelling = True  # never armed again
            if live.timer is not None:
                live.timer.cancel()
                live.timer = None
            if live.task is not None and live.task is not current:
                live.task.cancel()
            engine._let_go(live)
            for waiter in live.waiters:
                if not waiter.done():
                    waiter.set_exception(Moved())

    async def _drain(self, partitions: list[int]) -> None:
        """Let the attempts in flight in `partitions` finish, then drop their calls."""
        engine = self._engine
        self.draining.update(partitions)
        try:
            spare = set(partitions)
            busy = []
            for live in engine._live.values():
                if partition_of(live.rec.root_id) in spare:
                    if live.timer is not None:
                        live.timer.cancel()
                        live.timer = None
                    if live.task is not None:
                        busy.append(live.task)
            if busy:
                await asyncio.wait(busy, timeout=self._interval)
            self.drop(partitions)
        finally:
            self.draining.difference_update(partitions)

    # Wake-ups.

    def _waiter(self, dispatch_id: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(dispatch_id, []).append(future)
        return future

    def _forget(self, dispatch_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiters.get(dispatch_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiters[dispatch_id]

    def _done(self, ids: list[str]) -> None:
        for dispatch_id in ids:
            for future in self._waiters.get(dispatch_id, ()):
                if not future.done():
                    future.set_result(None)

    def _announced(self, partition: int, ids: list[str]) -> None:
        if partition not in self.owned or partition in self.draining:
            return
        missing = [i for i in ids if i not in self.submitting and self.adoptable(i)]
        if missing:
            self._spawn(self._adopt(missing))

    async def _adopt(self, ids: list[str]) -> None:
        engine = self._engine
        try:
            records = await self._coord.get_calls(ids)
        except StoreError as exc:
            logger.warning("could not load calls submitted to another replica: %s", exc)
            self._wake.set()  # reload the partitions at the next round
            return
        for rec in records:
            unfinished = rec.phase is not Phase.DONE
            if unfinished and self.adoptable(rec.id) and self.holds(rec.root_id):
                engine._adopt(rec)

    def _cancel_asked(self, dispatch_id: str) -> None:
        if dispatch_id in self._engine._live:
            self._spawn(self._cancel_here(dispatch_id))

    async def _cancel_here(self, dispatch_id: str) -> None:
        try:
            await self._engine.cancel(dispatch_id)
        except (LookupError, StoreError) as exc:
            logger.warning("could not cancel %s for another replica: %s", dispatch_id, exc)

    async def take_slot(self, function: str, limit: int) -> int:
        """Wait for one of the `limit` slots `function` has across the replicas; take it.

        Woken when a replica gives one back; a replica that dies frees its slots
        without a word, so the wait also looks again every second.

        Raises:
            StoreError: The store cannot be reached.
        """
        while True:
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.setdefault(function, []).append(waiter)
            try:
                async with self._slot_lock:
                    held = self._slots.setdefault(function, set())
                    taking = asyncio.ensure_future(
                        self._coord.take_slot(function, limit, sorted(held))
                    )
                    try:
                        # A cancellation must not leave a slot taken and not known.
                        slot = await asyncio.shield(taking)
                    except asyncio.CancelledError:
                        taking.add_done_callback(lambda done: self._untaken(function, done))
                        raise
                    if slot is not None:
                        held.add(slot)
                        return slot
                await asyncio.wait([waiter], timeout=_SLOT_RECHECK)
            finally:
                waiting = self._slot_waiters.get(function, [])
                if waiter in waiting:
                    waiting.remove(waiter)
                if not waiting:
                    self._slot_waiters.pop(function, None)

    def give_slot(self, function: str, slot: int) -> None:
        """Give a slot back (in the background: the attempt that held it has ended)."""

        async def give() -> None:
            try:
                await self._coord.give_slot(function, slot)
            except StoreError as exc:  # the connection ended, and the slot with it
                logger.info("could not give back a slot of %s: %s", function, exc)
            finally:
                self._slots.get(function, set()).discard(slot)

        self._spawn(give())

    def _untaken(self, function: str, taking: asyncio.Future[int | None]) -> None:
        """Give back a slot taken for an attempt that was cancelled meanwhile."""
        if not taking.cancelled() and taking.exception() is None:
            slot = taking.result()
            if slot is not None:
                self._slots.setdefault(function, set()).add(slot)
                self.give_slot(function, slot)

    def _slot_freed(self, function: str) -> None:
        for waiter in self._slot_waiters.get(function, []):
            if not waiter.done():
                waiter.set_result(None)

    def _schedules_changed(self) -> None:
        listener = self._engine.schedules_listener
        if listener is not None:
            listener()

    def _reconnected(self) -> None:
        # Notifications may have been missed: waiters look again, partitions reload.
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        if self.owned:
            self._spawn(self._reload(dict(self.owned)))
        self._engine._event_resolved(None)
        self._schedules_changed()

    async def _reload(self, held: dict[int, int]) -> None:
        try:
            engine = self._engine
            snapshot = await self._coord.load(list(held))
            for rec in snapshot.calls:
                if self.adoptable(rec.id) and self.holds(rec.root_id):
                    engine._adopt(rec)
        except StoreError as exc:
            logger.warning("could not reload the partitions held: %s", exc)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def announce(records: Iterable[CallRecord]) -> list[Op]:
    """Return the wake-ups, by partition, of new calls for the replicas holding them."""
    ids: dict[int, list[str]] = {}
    for rec in records:
        ids.setdefault(partition_of(rec.root_id), []).append(rec.id)
    return [Announce(p, tuple(found)) for p, found in ids.items()]


def _unfinished_below(dispatch_id: str, tree: list[CallRecord]) -> int:
    """Count the unfinished calls of the subtree of `dispatch_id` in `tree`."""
    children: dict[str, list[CallRecord]] = {}
    for rec in tree:
        children.setdefault(rec.parent_id, []).append(rec)
    count = 0
    top = [rec for rec in tree if rec.id == dispatch_id]
    while top:
        count += sum(rec.phase is not Phase.DONE for rec in top)
        top = [child for rec in top for child in children.get(rec.id, [])]
    return count


def _ranges(partitions: Iterable[int]) -> str:
    """Say a set of partitions briefly: "0-15, 32"."""
    spans: list[list[int]] = []
    for p in sorted(partitions):
        if spans and spans[-1][1] == p - 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
