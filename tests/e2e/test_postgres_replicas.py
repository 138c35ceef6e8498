"""Two scheduler replicas and two app replicas on one PostgreSQL database, for real.

1,000 jobs, each a function making three durable calls in a row, are submitted to
both schedulers (each accepts any submission; the one holding the job's partition
drives it). One process is SIGKILLed at a random moment while the jobs run: a
scheduler in the first test (its partitions go to the other once its leases expire),
an app replica in the second (its requests go to the other app). Every job must end
with its result, none lost, each job made exactly its three calls, and no step ever
ran twice at the same time: each run of a step appends a line when it begins and one
when it ends, with the system-wide monotonic clock, and the runs of a step may not
overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import asyncpg
from ports import free_ports

from dispatch_aio import Call, Client
from dispatch_aio._codec import decode_value
from dispatch_aio._status import Status
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.proto.v1 import inspect_pb2

from .harness import PYTHON, Proc, Server, Starter, start_server, wait_for_port

JOBS = 1000
STEPS = 3
LEASE = 2.0  # seconds: the takeover after a kill comes within this
ENDPOINT = "http://app.invalid:8000"  # what the calls name; the schedulers map it

APP = textwrap.dedent(
    """
    import asyncio
    import os
    import sys
    import time
    import uuid

    from dispatch_aio import Dispatch

    dispatch = Dispatch()
    log = open(os.environ["STEPS_LOG"], "a", buffering=1)


    @dispatch.function
    async def step(i: int, k: int) -> int:
        run = uuid.uuid4().hex[:12]
        log.write(f"begin {i}.{k} {run} {time.monotonic():.6f} {os.getpid()}\\n")
        await asyncio.sleep(0.05)  # waited out in the run: a step takes a while
        log.write(f"end {i}.{k} {run} {time.monotonic():.6f} {os.getpid()}\\n")
        return i * 10 + k


    @dispatch.function
    async def job(i: int) -> int:
        total = 0
        for k in range(3):
            total += await step(i, k)
        return total


    if __name__ == "__main__":
        dispatch.run()
    """
)


class Cluster:
    """Two `dispatch-aio server` replicas and two app replicas on one database."""

    def __init__(self, procs: Starter, tmp_path: Path, pg_url: str) -> None:
        self.procs = procs
        self.tmp = tmp_path
        self.url = pg_url
        self.log = tmp_path / "steps.log"
        self.log.touch()
        self.cut_short = 0
        self.app_ports = free_ports(2)
        urls = ",".join(f"http://127.0.0.1:{port}" for port in self.app_ports)
        self.servers: list[Server] = []
        for n in range(2):
            args = [
                "--port", "0",
                "--database", pg_url,
                "--data-dir", str(tmp_path / f"server{n}"),
                "--api-key", "replicas-key",
                "--lease-timeout", str(LEASE),
                "--replica", f"{ENDPOINT}={urls}",
            ]  # fmt: skip
            self.servers.append(start_server(procs, *args))
        (tmp_path / "app.py").write_text(APP)
        self.apps: list[Proc] = []
        for port in self.app_ports:
            env = self.servers[0].app_env(
                DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}", STEPS_LOG=str(self.log)
            )
            self.apps.append(procs([PYTHON, str(tmp_path / "app.py")], env=env))
        for app, port in zip(self.apps, self.app_ports, strict=True):
            wait_for_port(port, proc=app)

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url)

    async def balanced(self) -> None:
        """Wait until each scheduler holds half of the partitions."""
        conn = await self.db()
        try:
            async with asyncio.timeout(4 * LEASE):
                for _ in itertools.count():
                    shares = await conn.fetch(
                        "SELECT owner, count(*) FROM dispatch_leases "
                        "WHERE expires_at > now() GROUP BY owner"
                    )
                    if sorted(n for _, n in shares) == [32, 32]:
                        return
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def submit(self) -> dict[str, int]:
        """Submit the jobs, half to each scheduler; return job number by dispatch id."""
        accepted: dict[str, int] = {}

        async def send(server: Server, numbers: list[int]) -> None:
            async with Client(
                api_key=server.api_key, api_url=server.api_url, endpoint_url=ENDPOINT, env={}
            ) as client:
                for first in range(0, len(numbers), 100):
                    batch = numbers[first : first + 100]
                    ids = await client.dispatch([Call("job", (i,)) for i in batch])
                    accepted.update(zip(ids, batch, strict=True))

        await asyncio.gather(
            *(send(s, list(range(n, JOBS, 2))) for n, s in enumerate(self.servers))
        )
        return accepted

    async def held_by(self, pid: int, count: int) -> None:
        """Wait until the scheduler of process `pid` holds `count` partitions."""
        conn = await self.db()
        try:
            async with asyncio.timeout(4 * LEASE):
                for _ in itertools.count():
                    held = await conn.fetchval(
                        "SELECT count(*) FROM dispatch_leases "
                        "WHERE owner LIKE $1 AND expires_at > now()",
                        f"%-{pid}-%",
                    )
                    if held == count:
                        return
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    async def running_step(self, pid: int) -> None:
        """Wait until process `pid` runs a step begun so lately that a kill now cuts it."""
        async with asyncio.timeout(10):
            for _ in itertools.count():
                open_runs: dict[str, float] = {}
                for line in self.log.read_text().splitlines():
                    what, _key, run, at, by = line.split()
                    if by == str(pid):
                        if what == "begin":
                            open_runs[run] = float(at)
                        else:
                            open_runs.pop(run, None)
                # A step takes 50 ms: one begun within 20 ms is still running at the kill.
                if open_runs and time.monotonic() - max(open_runs.values()) < 0.02:
                    return
                await asyncio.sleep(0.005)

    async def unfinished(self, owner_pid: int | None = None) -> int:
        conn = await self.db()
        try:
            if owner_pid is None:
                return int(
                    await conn.fetchval("SELECT count(*) FROM dispatch_calls WHERE phase <> 4")
                )
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM dispatch_calls c JOIN dispatch_leases l "
                    "ON l.partition = c.partition WHERE c.phase <> 4 AND l.owner LIKE $1",
                    f"%-{owner_pid}-%",
                )
            )
        finally:
            await conn.close()

    async def into_the_run(self, owner_pid: int | None = None) -> None:
        """Wait a random moment into the run, less if its work (or the replica's) is
        nearly done: a kill must come while there is some left."""
        deadline = time.monotonic() + random.uniform(0.1, 0.8)
        for _ in itertools.count():
            if time.monotonic() >= deadline or await self.unfinished(owner_pid) <= JOBS // 10:
                break
            await asyncio.sleep(0.02)

    async def check(self, accepted: dict[str, int], server: Server, killed_at: float) -> None:
        """Every job done with its result, its three calls made once, no step overlapping."""
        async with asyncio.timeout(30):
            for _ in itertools.count():
                if not await self.unfinished():
                    break
                await asyncio.sleep(0.1)
        async with InspectClient(server.api_url, server.api_key) as inspect:
            tops = await inspect.iter_calls(inspect_pb2.ListCallsRequest(top_level_only=True))
            sample = random.sample(sorted(accepted), 10)
            waited = [await inspect.wait_call(i, 5) for i in sample]  # results on any replica
        assert len(tops) == JOBS
        for info in [*tops, *waited]:
            assert info.state == inspect_pb2.CALL_STATE_DONE, info
            assert info.status == Status.OK, info
            assert decode_value(info.result.output) == 30 * accepted[info.dispatch_id] + 3
        conn = await self.db()
        try:
            made = await conn.fetch(
                "SELECT parent_id, count(*) FROM dispatch_calls WHERE parent_id <> '' "
                "GROUP BY parent_id"
            )
            assert await conn.fetchval("SELECT count(*) FROM dispatch_results") == 0
        finally:
            await conn.close()
        assert dict(made) == dict.fromkeys(accepted, STEPS)

        runs: dict[str, dict[str, list[float]]] = defaultdict(dict)
        for line in self.log.read_text().splitlines():
            _what, key, run, at, _pid = line.split()
            runs[key].setdefault(run, []).append(float(at))
        assert set(runs) == {f"{i}.{k}" for i in range(JOBS) for k in range(STEPS)}
        again = 0
        self.cut_short = sum(len(times) == 1 for found in runs.values() for times in found.values())
        for key, found in runs.items():
            # A run cut short by a kill ends, at the latest, at the kill.
            spans = sorted(
                (times[0], times[1] if len(times) > 1 else killed_at) for times in found.values()
            )
            again += len(spans) - 1
            for (_, end), (begin, _) in itertools.pairwise(spans):
                assert begin >= end, f"step {key} ran twice at once: {spans}"
        print(f"{again} steps ran again after the kill, {self.cut_short} runs cut short")


async def test_a_scheduler_replica_killed_mid_run_loses_no_job(
    procs: Starter, tmp_path: Path, pg_url: str
) -> None:
    started = time.perf_counter()
    cluster = Cluster(procs, tmp_path, pg_url)
    await cluster.balanced()
    accepted = await cluster.submit()
    assert len(accepted) == JOBS
    victim, survivor = random.sample(cluster.servers, 2)
    await cluster.into_the_run(victim.proc.popen.pid)
    assert await cluster.unfinished(victim.proc.popen.pid) > 0  # it drove calls
    victim.proc.kill()  # SIGKILL: its leases expire, the other replica takes them
    killed_at = time.monotonic()
    await cluster.held_by(survivor.proc.popen.pid, 64)
    took = time.monotonic() - killed_at
    # Within the lease timeout (from its last renewal, up to a third of it before the
    # kill), and a moment for a loaded machine.
    assert took < LEASE + 1.5, took
    await cluster.check(accepted, survivor, killed_at)
    assert cluster.cut_short == 0  # the apps ran on: every run of a step ended
    print(f"scheduler replica kill: partitions taken over in {took:.2f} s, ", end="")
    print(f"{time.perf_counter() - started:.1f} s in all")
    survivor.proc.send(signal.SIGINT)
    assert survivor.proc.wait(10) == 0


async def test_an_app_replica_killed_mid_run_loses_no_job(
    procs: Starter, tmp_path: Path, pg_url: str
) -> None:
    started = time.perf_counter()
    cluster = Cluster(procs, tmp_path, pg_url)
    await cluster.balanced()
    accepted = await cluster.submit()
    await cluster.into_the_run()
    assert await cluster.unfinished() > 0
    victim = random.choice(cluster.apps)
    await cluster.running_step(victim.popen.pid)  # killed in the middle of a step
    victim.kill()
    killed_at = time.monotonic()
    await cluster.check(accepted, cluster.servers[0], killed_at)
    assert cluster.cut_short > 0
    print(f"app replica kill: {time.perf_counter() - started:.1f} s")
