"""The batch extension: several Run requests to one endpoint in one HTTP exchange.

Between dispatch_aio's scheduler and an endpoint of this SDK (aiohttp or ASGI), Run
requests made at the same moment to the same endpoint travel together (see ``RunBatch`` in
batch.proto): one signature, one request and one response instead of one each. The
endpoint announces the route on its Run responses with ``Dispatch-Aio-Batch: 1``; the
scheduler sends batches only after that, and plain Run requests to any other endpoint
(another SDK, a Run route mounted alone, where a batch gets 404 once).
"""

from __future__ import annotations

__all__ = ["BATCH_HEADER", "BATCH_PATH", "BATCH_TYPE", "FRAME_HEADER", "frame", "frame_length"]

from .proto.v1 import batch_pb2

BATCH_PATH = "/dispatch_aio.v1.FunctionService/RunBatch"
"""Path of the batch route, under the endpoint URL (beside the Run route)."""
BATCH_HEADER = "Dispatch-Aio-Batch"
"""On a Run response: "1" when the endpoint serves `BATCH_PATH` beside it."""
BATCH_TYPE = "application/x-dispatch-aio-batch"
"""Content-Type of a batch's answers (a stream of framed ``BatchAnswer``s)."""
FRAME_HEADER = 4
"""Bytes of the length before each ``BatchAnswer``, big-endian."""


def frame(answer: batch_pb2.BatchAnswer) -> bytes:
    """Serialize an answer with its length before it."""
    data = answer.SerializeToString()
    return len(data).to_bytes(FRAME_HEADER, "big") + data


def frame_length(header: bytes) -> int:
    """The length of the answer after a frame header."""
    return int.from_bytes(header, "big")
