"""Determinism across processes, and replay of committed golden journals."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from dispatch_aio import _codec
from dispatch_aio._status import Status
from dispatch_aio.durable import Clock, Runner
from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.proto.v1 import journal_pb2

from .workflows import FUNCTIONS

HERE = pathlib.Path(__file__).parent


def _record(hashseed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run(
        [sys.executable, str(HERE / "record_journal.py")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    record: dict[str, Any] = json.loads(out.stdout)
    del record["result"]["token"]  # drawn from the run's random seed
    return record


def test_same_journal_under_different_hash_seeds() -> None:
    records = [_record(seed) for seed in ("0", "1", "4242")]
    assert records[0] == records[1] == records[2]
    result = records[0]["result"]
    assert sorted(result["firsts"]) == [i * i for i in range(8)]
    assert sorted(result["completed"]) == [i * i for i in range(8)]
    assert result["late"] == -1


class _Later(Clock):
    """The journal was recorded in the past (on a virtual clock): resume a day after it."""

    def __init__(self, base: float) -> None:
        self.base = base

    def time(self) -> float:
        return self.base + 86400


async def test_golden_journal_replays() -> None:
    """A journal recorded by version 1 of the format still replays to the same result."""
    request = function_pb2.RunRequest.FromString((HERE / "golden" / "mixed-v1.bin").read_bytes())
    table = {f.name: f.fn for f in FUNCTIONS}
    journal = journal_pb2.Journal.FromString(request.poll_result.typed_coroutine_state.value)
    assert journal.version == 1
    runner = Runner(table.get, cache_size=0, clock=_Later(journal.epochs[-1].time))
    response = await runner.run(request)
    assert response.status == Status.OK, response
    result = _codec.decode_value(response.exit.result.output)
    expected = json.loads((HERE / "golden" / "mixed-v1.json").read_text())["result"]
    assert result == expected
