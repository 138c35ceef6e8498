"""An endpoint served by several app replicas: resumes stay where the run is live.

Two real endpoints on loopback, each its own `Dispatch` object with its own live cache,
declared as the replicas of one endpoint URL. A function that suspends between its
steps records each step it runs: a resume that finds the run live records nothing
twice, while a replay (another replica, or a cache miss) runs the earlier steps again.
A durable timer suspends a run for at least a second: each step costs about one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio import Dispatch
from dispatch_aio._codec import decode_value, encode_input
from dispatch_aio._endpoint import EndpointServer
from dispatch_aio._signature import public_key_to_base64
from dispatch_aio.proto.sdk.v1 import call_pb2
from dispatch_aio.scheduler import Scheduler

ENDPOINT = "http://app.invalid:8000"  # what calls name; only its replicas are reached
API_KEY = "replicas-test-key"


@dataclass
class Replica:
    label: str
    server: EndpointServer
    dispatch: Dispatch
    steps: list[tuple[str, int]] = field(default_factory=list)  # (tag, step) it ran
    busy: asyncio.Event = field(default_factory=asyncio.Event)  # it ran a step


async def start_replica(label: str, key: Ed25519PrivateKey) -> Replica:
    dispatch = Dispatch(
        env={},
        api_url="http://127.0.0.1:9",  # served over HTTP to a separate scheduler
        endpoint_addr="127.0.0.1:0",
        verification_key=public_key_to_base64(key.public_key()),
        live_timer_threshold=0.0,  # every sleep suspends: each step is a resume
    )
    ran: list[tuple[str, int]] = []
    busy = asyncio.Event()

    @dispatch.function(name="steps")
    async def steps(tag: str, n: int, pause: float) -> str:
        for i in range(n):
            ran.append((tag, i))
            busy.set()
            await asyncio.sleep(pause)
        return tag

    server = await dispatch.start()
    return Replica(label, server, dispatch, ran, busy)


@pytest.fixture
async def scheduler_and_replicas() -> AsyncIterator[tuple[Scheduler, list[Replica]]]:
    key = Ed25519PrivateKey.generate()
    replicas = [await start_replica(label, key) for label in ("a", "b")]
    scheduler = Scheduler(
        ":memory:",
        api_key=API_KEY,
        signing_key=key,
        replicas={ENDPOINT: [r.server.url for r in replicas]},
    )
    await scheduler.start()
    try:
        yield scheduler, replicas
    finally:
        await scheduler.close()
        for replica in replicas:
            await replica.server.aclose()


def call(tag: str, n: int, pause: float) -> call_pb2.Call:
    return call_pb2.Call(
        function="steps", endpoint=ENDPOINT, input=encode_input((tag, n, pause), {})
    )


async def results(scheduler: Scheduler, ids: list[str]) -> list[object]:
    async with asyncio.timeout(60):
        done = [await scheduler.wait(i) for i in ids]
    return [decode_value(r.output) for r in done]


async def test_resumes_go_to_the_replica_that_holds_the_run(
    scheduler_and_replicas: tuple[Scheduler, list[Replica]],
) -> None:
    scheduler, replicas = scheduler_and_replicas
    tags = [f"c{i}" for i in range(24)]
    ids = await scheduler.dispatch([call(tag, 3, 0.01) for tag in tags])
    assert await results(scheduler, ids) == tags
    for replica in replicas:
        assert replica.steps, f"replica {replica.label} got no call"
    for tag in tags:
        where = [r.label for r in replicas for t, _ in r.steps if t == tag]
        steps = sorted(i for r in replicas for t, i in r.steps if t == tag)
        assert len(set(where)) == 1, f"{tag} ran on {where}"
        assert steps == [0, 1, 2], f"{tag} was replayed: {steps}"


async def test_another_replica_takes_over_when_one_is_down(
    scheduler_and_replicas: tuple[Scheduler, list[Replica]],
) -> None:
    scheduler, replicas = scheduler_and_replicas
    first, second = replicas
    tags = [f"d{i}" for i in range(16)]
    ids = await scheduler.dispatch([call(tag, 2, 0.01) for tag in tags])
    await asyncio.wait_for(first.busy.wait(), 30)
    await first.server.aclose()  # its suspended runs must resume on the other replica
    on_first = {t for t, _ in first.steps}
    assert await results(scheduler, ids) == tags
    for tag in on_first:
        replayed = sorted(i for t, i in second.steps if t == tag)
        assert replayed == [0, 1], (tag, replayed)  # replayed there from the start
