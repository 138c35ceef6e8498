"""Call.version: a call tree keeps its version, and a version can run at an endpoint of its own."""

from __future__ import annotations

import asyncio
import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_aio.proto.sdk.v1 import function_pb2
from dispatch_aio.scheduler import Scheduler

from .scripted import API_KEY, FAST_RETRY, ScriptedEndpoint, call, ok, poll, resumed, unpack_text

# Nothing listens there: a call reaches the scripted endpoint only through its version.
NOWHERE = "http://127.0.0.1:9"


async def test_a_version_runs_at_its_endpoint_and_children_keep_it(
    endpoint: ScriptedEndpoint, signing_key: Ed25519PrivateKey
) -> None:
    s = Scheduler(
        ":memory:", api_key=API_KEY, signing_key=signing_key, retry=FAST_RETRY,
        default_endpoint=NOWHERE,
    )  # fmt: skip
    s._settings = dataclasses.replace(s._settings, version_endpoints={"v2": endpoint.url})
    await s.start()
    try:
        endpoint.on("child", lambda req: ok("c"))

        def parent(req: function_pb2.RunRequest) -> function_pb2.RunResponse:
            if not resumed(req):
                return poll([call("child", "x", 1)], state=b"s")  # no version, no endpoint
            return ok("done")

        endpoint.on("parent", parent)
        [dispatch_id] = await s.dispatch([call("parent", "p", endpoint=NOWHERE, version="v2")])
        async with asyncio.timeout(10):
            result = await s.wait(dispatch_id)
        assert unpack_text(result.output) == "done"
        assert len(endpoint.requests_for("child")) == 1
    finally:
        await s.close()
