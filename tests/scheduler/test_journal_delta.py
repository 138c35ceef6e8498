"""The journal extension between the local scheduler and an endpoint of this SDK.

The scheduler announces it on every Run request; the endpoint answers Polls with
JournalDelta states, which the scheduler appends as segments, and resumes carry a
JournalRef. A run the endpoint no longer holds live costs one more request, with the
whole journal joined from the segments. Real HTTP, real SQLite files, a real endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio import Dispatch, Status
from dispatch_aio.cli._check import _from_database
from dispatch_aio.durable import Runner
from dispatch_aio.durable._journal import (
    JOURNAL_DELTA_TYPE_URL,
    JOURNAL_NEEDED,
    JOURNAL_REF_TYPE_URL,
    JOURNAL_TYPE_URL,
)
from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.proto.v1 import journal_pb2
from dispatch_aio.scheduler import Scheduler
from dispatch_aio.scheduler._engine import JOURNAL_NEEDED as ENGINE_JOURNAL_NEEDED
from dispatch_aio.scheduler._engine import _kept_state
from dispatch_aio.scheduler.store import CallRecord, Phase, StateKind
from dispatch_aio.scheduler.store._sqlite import _SCHEMA_V1, SCHEMA_VERSION, SQLiteStore
from dispatch_aio.testing import check_journals

from .scripted import API_KEY, FAST_RETRY

Exchange = tuple[function_pb2.RunRequest, bool, function_pb2.RunResponse]


def test_both_ends_agree_on_the_wire_names() -> None:
    assert ENGINE_JOURNAL_NEEDED == JOURNAL_NEEDED


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> list[Exchange]:
    """Every Run request the endpoint's runner answers, with the announcement and answer."""
    seen: list[Exchange] = []
    original = Runner.run

    async def spy(
        self: Runner, request: function_pb2.RunRequest, *, journal_delta: bool = False
    ) -> function_pb2.RunResponse:
        response = await original(self, request, journal_delta=journal_delta)
        seen.append((request, journal_delta, response))
        return response

    monkeypatch.setattr(Runner, "run", spy)
    return seen


Stack = Callable[..., Awaitable[tuple[Scheduler, Dispatch]]]


@pytest.fixture
async def stack(signing_key: Ed25519PrivateKey, tmp_path: Path) -> AsyncIterator[Stack]:
    """Make a scheduler on a database file and an app served to it."""
    opened: list[Any] = []

    async def make(
        app: Dispatch | None = None, *, start_app: bool = True, **options: Any
    ) -> tuple[Scheduler, Dispatch]:
        scheduler = Scheduler(
            str(tmp_path / "db"), api_key=API_KEY, signing_key=signing_key, retry=FAST_RETRY
        )
        await scheduler.start()
        opened.append(scheduler)
        api_url = await scheduler.serve("127.0.0.1", 0)
        if app is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            app = Dispatch(
                api_key=API_KEY,
                api_url=api_url,
                endpoint_url=f"http://127.0.0.1:{port}",
                endpoint_addr=f"127.0.0.1:{port}",
                verification_key=scheduler.verification_key,
                **options,
            )
            opened.append(app)
            if start_app:
                opened.append(await app.start())
        return scheduler, app

    yield make
    for thing in reversed(opened):
        await thing.aclose() if hasattr(thing, "aclose") else await thing.close()


def _chain(app: Dispatch, gate: asyncio.Event | None = None, at: int = -1) -> Any:
    @app.function(name="step")
    async def step(i: int) -> int:
        if i == at and gate is not None:
            await gate.wait()
        return i

    @app.function(name="chain")
    async def chain(n: int) -> int:
        total = 0
        for i in range(n):
            total += await step(i)
        return total

    return chain


def _state_url(exchange: Exchange) -> str:
    return exchange[0].poll_result.typed_coroutine_state.type_url


async def test_a_chain_sends_deltas_and_references_of_flat_size(
    stack: Stack, exchanges: list[Exchange]
) -> None:
    _, app = await stack()
    chain = _chain(app)
    dispatch_id = await chain.dispatch(60)
    assert await app.client.result(dispatch_id, timeout=30) == sum(range(60))
    rounds = [e for e in exchanges if e[0].function == "chain"]
    assert len(rounds) == 61
    assert all(announced for _, announced, _ in rounds)
    polls = [r.poll for _, _, r in rounds if r.HasField("poll")]
    assert {p.typed_coroutine_state.type_url for p in polls} == {JOURNAL_DELTA_TYPE_URL}
    resumes = [e for e in rounds if e[0].HasField("poll_result")]
    assert {_state_url(e) for e in resumes} == {JOURNAL_REF_TYPE_URL}
    # What travels does not grow with the history.
    sizes = [len(req.SerializeToString()) for req, _, _ in resumes]
    assert max(sizes) - min(sizes) < 16, sizes
    deltas = [len(p.typed_coroutine_state.value) for p in polls]
    assert max(deltas[1:]) - min(deltas[1:]) < 16, deltas


async def test_a_run_the_endpoint_no_longer_holds_gets_the_whole_journal(
    stack: Stack, exchanges: list[Exchange]
) -> None:
    # One live run at most: two chains evict each other at every round.
    _, app = await stack(cache_size=1)
    chain = _chain(app)
    ids = [await chain.dispatch(12), await chain.dispatch(12)]
    results = await asyncio.gather(*(app.client.result(i, timeout=30) for i in ids))
    assert results == [sum(range(12))] * 2
    rounds = [e for e in exchanges if e[0].function == "chain"]
    needed = [e for e in rounds if e[2].exit.result.error.type == JOURNAL_NEEDED]
    whole = [e for e in rounds if _state_url(e) == JOURNAL_TYPE_URL]
    assert needed and len(whole) == len(needed)
    for request, _, response in whole:
        journal = journal_pb2.Journal.FromString(request.poll_result.typed_coroutine_state.value)
        assert journal.function == "chain" and journal.polls >= 1
        # Replayed from the whole journal, the run goes on with deltas.
        if not response.HasField("poll"):
            continue
        assert response.poll.typed_coroutine_state.type_url == JOURNAL_DELTA_TYPE_URL
        delta = journal_pb2.JournalDelta.FromString(response.poll.typed_coroutine_state.value)
        assert delta.polls_before == journal.polls


async def test_without_the_live_cache_the_plain_protocol_is_kept(
    stack: Stack, exchanges: list[Exchange]
) -> None:
    _, app = await stack(cache_size=0)
    chain = _chain(app)
    dispatch_id = await chain.dispatch(5)
    assert await app.client.result(dispatch_id, timeout=30) == 10
    resumes = [e for e in exchanges if e[0].function == "chain" and e[0].HasField("poll_result")]
    assert {_state_url(e) for e in resumes} == {JOURNAL_TYPE_URL}


def _database(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{tmp_path / 'db'}?mode=ro", uri=True)


async def test_segments_are_durable_across_restarts_of_both_ends(
    stack: Stack, tmp_path: Path, exchanges: list[Exchange]
) -> None:
    gate = asyncio.Event()
    scheduler, app = await stack()
    chain = _chain(app, gate, at=4)
    dispatch_id = await chain.dispatch(8)
    async with asyncio.timeout(20):
        while not any(e[0].function == "chain" and e[2].poll.calls for e in exchanges[4:]):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
    await scheduler.close()
    db = _database(tmp_path)
    try:
        ((kind, state),) = db.execute(
            "SELECT state_kind, state FROM calls WHERE function = 'chain'"
        ).fetchall()
        assert kind == StateKind.SEGMENTS
        assert len(state) < 100  # a JournalRef, not the journal
        count = db.execute("SELECT count(*) FROM segments").fetchone()[0]
        assert count == 5
    finally:
        db.close()
    # `dispatch-aio check` reads the journal joined from its segments.
    ((label, journal),) = _from_database(tmp_path / "db")
    assert label == dispatch_id
    assert journal_pb2.Journal.FromString(journal).polls == 5
    (report,) = await check_journals(app, [(label, journal)])
    assert report.ok, report.problem

    # The app forgets its live runs too: the new scheduler sends the whole journal.
    await app.aclose()
    gate.set()
    before = len(exchanges)
    scheduler2, _ = await stack(app)
    result = await scheduler2.wait(dispatch_id)
    assert result.output.value  # sum(range(8)) == 28, as a packed Int64Value
    assert any(_state_url(e) == JOURNAL_TYPE_URL for e in exchanges[before:])
    await scheduler2.close()
    db = _database(tmp_path)
    try:
        assert db.execute("SELECT count(*) FROM segments").fetchone()[0] == 0
    finally:
        db.close()


async def test_tail_calls_and_restarts_drop_the_segments(
    stack: Stack, tmp_path: Path, exchanges: list[Exchange]
) -> None:
    # A segment left behind would collide with the new run's first one (same round):
    # the calls would never finish.
    scheduler, app = await stack()
    gate = asyncio.Event()
    version = [0]

    @app.function(name="step")
    async def step(i: int) -> int:
        if i == 100:
            await gate.wait()
        return i

    @app.function(name="countdown")
    async def countdown(n: int) -> int:
        await step(n)
        if n > 0:
            countdown.tail_call(n - 1)
        return n

    @app.function(name="diverging")
    async def diverging() -> int:
        return await step(version[0]) + await step(100) + await step(version[0] + 1)

    dispatch_id = await countdown.dispatch(3)
    assert await app.client.result(dispatch_id, timeout=30) == 0

    dispatch_id = await diverging.dispatch()
    async with asyncio.timeout(20):
        polls = [e for e in exchanges if e[0].function == "diverging" and e[2].poll.calls]
        while len(polls) < 2:
            polls = [e for e in exchanges if e[0].function == "diverging" and e[2].poll.calls]
            await asyncio.sleep(0.01)
    version[0] = 7  # the code changed: replaying the journal diverges
    await app.aclose()  # and the live run is gone
    gate.set()
    assert await app.client.result(dispatch_id, timeout=30) == 7 + 100 + 8
    assert any(
        Status(e[2].status) is Status.INCOMPATIBLE_STATE
        for e in exchanges
        if e[0].function == "diverging"
    )
    await scheduler.close()
    db = _database(tmp_path)
    try:
        assert db.execute("SELECT count(*) FROM segments").fetchone()[0] == 0
    finally:
        db.close()


def _record(kind: StateKind, state: bytes) -> CallRecord:
    return CallRecord(
        id="c",
        root_id="c",
        parent_id="",
        correlation_id=0,
        parent_generation=0,
        endpoint="http://x",
        function="f",
        input=b"",
        version="",
        created_at=0.0,
        expires_at=1.0,
        phase=Phase.SUSPENDED,
        updated_at=0.0,
        state_kind=kind,
        state=state,
    )


def _poll(delta: journal_pb2.JournalDelta) -> Any:
    from dispatch_aio.proto.sdk.v1 import poll_pb2

    poll = poll_pb2.Poll()
    poll.typed_coroutine_state.type_url = JOURNAL_DELTA_TYPE_URL
    poll.typed_coroutine_state.value = delta.SerializeToString()
    return poll


def test_a_delta_must_continue_the_journal_kept() -> None:
    from google.protobuf import any_pb2

    run = b"r" * 16
    ref = journal_pb2.JournalRef(run_id=run, polls=3, tag=b"t")
    kept = any_pb2.Any(type_url=JOURNAL_REF_TYPE_URL, value=ref.SerializeToString())
    rec = _record(StateKind.SEGMENTS, kept.SerializeToString())
    ok = _kept_state(rec, _poll(journal_pb2.JournalDelta(run_id=run, polls_before=3, polls=4)))
    assert not isinstance(ok, str) and ok[0] is StateKind.SEGMENTS
    gap = _kept_state(rec, _poll(journal_pb2.JournalDelta(run_id=run, polls_before=2, polls=3)))
    assert isinstance(gap, str) and "round 2" in gap
    other = _kept_state(rec, _poll(journal_pb2.JournalDelta(run_id=b"x" * 16, polls_before=3)))
    assert isinstance(other, str)
    # After the whole journal went (plain protocol, or a cache miss), it becomes a segment.
    journal = journal_pb2.Journal(run_id=run, polls=3, function="f")
    whole = any_pb2.Any(type_url=JOURNAL_TYPE_URL, value=journal.SerializeToString())
    rec = rec._replace(state_kind=StateKind.TYPED, state=whole.SerializeToString())
    converted = _kept_state(
        rec, _poll(journal_pb2.JournalDelta(run_id=run, polls_before=3, polls=4, segment=b"s"))
    )
    assert not isinstance(converted, str)
    assert [(op.polls, op.data) for op in converted[2]] == [  # type: ignore[union-attr]
        (3, journal.SerializeToString()),
        (4, b"s"),
    ]


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.read_segments("nothing") == []
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
