"""Run the `mixed` workflow once and print its final journal (normalized) as JSON.

Used by the determinism test (in subprocesses with different PYTHONHASHSEED
values) and to record golden journals: `python tests/durable/record_journal.py
--golden tests/durable/golden/mixed.bin`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dispatch_aio.proto.v1 import journal_pb2
from dispatch_aio.testing import Environment
from durable.workflows import FUNCTIONS, mixed


def normalize(state: bytes) -> bytes:
    """Drop what legitimately differs between runs: ids, seeds, times."""
    journal = journal_pb2.Journal.FromString(state)
    journal.run_id = b"\0" * 16
    journal.seed = 0
    journal.start_time = 0
    journal.monotonic_offset = 0
    for epoch in journal.epochs:
        epoch.time = 0
    return journal.SerializeToString(deterministic=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--golden", type=pathlib.Path)
    args = parser.parse_args()
    env = Environment(FUNCTIONS, journal="whole")
    result = await env.call(mixed, 8)
    last = [r for r in env.requests if r.function == "mixed" and r.HasField("poll_result")][-1]
    state = last.poll_result.typed_coroutine_state.value
    if args.golden:
        args.golden.write_bytes(last.SerializeToString())
    await env.aclose()
    print(json.dumps({"digest": hashlib.sha256(normalize(state)).hexdigest(), "result": result}))


if __name__ == "__main__":
    asyncio.run(main())
