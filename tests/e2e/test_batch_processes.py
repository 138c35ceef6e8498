"""End to end: the batch transport between `dispatch-aio server` and an app, two processes.

The app mounts the endpoint in its own aiohttp application, under a prefix, behind a
middleware that counts the requests by path (and leaves the bodies unread, as
`Dispatch.routes` asks). A fan-out then reaches it in fewer requests than it has
children, most of them batches: the two processes negotiated the extension over
real HTTP, each with its own key, signature and replay guard. A chain of awaits
reaches it in one batch a step, on a connection kept from one exchange to the next,
and goes on so in a new interpreter after the app is killed mid-chain.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable
from pathlib import Path

from ports import free_port

from dispatch_aio import Call, Client
from dispatch_aio._codec import decode_value
from dispatch_aio._status import Status
from dispatch_aio.cli._inspect import InspectClient
from dispatch_aio.proto.v1 import inspect_pb2

from .harness import PYTHON, Proc, Server, Starter, start_server, wait_for_port
from .test_crash import UNFINISHED

APP = textwrap.dedent(
    """
    import collections
    import sys

    from aiohttp import web

    sys.path.insert(0, sys.argv[2])
    from workloads import dispatch  # fan_out and double, as the other end-to-end tests

    SEEN: collections.Counter[str] = collections.Counter()
    PEERS = set()  # the scheduler's end of each connection


    @web.middleware
    async def count(request, handler):
        SEEN[request.path] += 1
        PEERS.add(request.transport.get_extra_info("peername"))
        return await handler(request)


    @dispatch.function
    async def requests_seen() -> tuple[dict[str, int], int]:
        # The requests by path, and the connections they came on, since the last call.
        seen = dict(SEEN), len(PEERS)
        SEEN.clear()
        PEERS.clear()
        return seen


    app = web.Application(middlewares=[count])
    app.add_routes(dispatch.routes(prefix="/durable"))
    app.cleanup_ctx.append(dispatch.cleanup_ctx)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
    """
)

RUN = "/durable/dispatch.sdk.v1.FunctionService/Run"
BATCH = "/durable/dispatch_aio.v1.FunctionService/RunBatch"


async def _call(client: Client, inspect: InspectClient, function: str, *args: object) -> object:
    (dispatch_id,) = await client.dispatch([Call(function, args)])
    info = await inspect.wait_call(dispatch_id, 60)
    assert info.state == inspect_pb2.CALL_STATE_DONE, info
    assert info.status == Status.OK, info
    return decode_value(info.result.output)


def _serve(procs: Starter, tmp_path: Path) -> tuple[Server, Callable[[], Proc], str]:
    """A `dispatch-aio server`, a way to start the app (again), and the app's endpoint."""
    port = free_port()
    server = start_server(
        procs,
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--endpoint",
        f"127.0.0.1:{port}",
    )
    script = tmp_path / "mounted_app.py"
    script.write_text(APP)
    here = str(Path(__file__).parent)

    def start_app() -> Proc:
        app = procs([PYTHON, str(script), str(port), here], env=server.app_env())
        wait_for_port(port, proc=app)
        return app

    return server, start_app, f"http://127.0.0.1:{port}/durable"


async def test_a_fan_out_reaches_a_mounted_app_in_batches(procs: Starter, tmp_path: Path) -> None:
    server, start_app, endpoint = _serve(procs, tmp_path)
    app = start_app()
    n = 300
    async with (
        Client(
            api_key=server.api_key, api_url=server.api_url, endpoint_url=endpoint, env={}
        ) as client,
        InspectClient(server.api_url, server.api_key) as inspect,
    ):
        assert await _call(client, inspect, "fan_out", n) == [2 * i for i in range(n)]
        seen, _ = await _call(client, inspect, "requests_seen")  # type: ignore[misc]
        plain, batches = seen.get(RUN, 0), seen.get(BATCH, 0)
        assert set(seen) <= {RUN, BATCH}, seen
        assert batches >= 1, seen
        # fan_out's first run and resumes, and its n children: far fewer exchanges.
        assert plain + batches < n // 2, seen

        # A chain: one batch a step (the child's run and the caller's resume), each
        # read to its end so that its connection serves the next exchange.
        assert await _call(client, inspect, "chain", 300) == 300
        seen, connections = await _call(client, inspect, "requests_seen")  # type: ignore[misc]
    # The chain's first run, its 300 steps, and the request of requests_seen itself.
    assert seen == {RUN: 2, BATCH: 300}, seen
    # Connections are kept: a few, as the next exchange may leave while the last one's
    # stream is read to its end. A stream left unread closes its connection: about
    # one exchange in five made a new one then (60 or more here).
    assert connections <= 10, connections
    assert app.poll() is None, app.dump()


async def test_a_chain_goes_on_one_batch_a_step_in_a_restarted_app(
    procs: Starter, tmp_path: Path
) -> None:
    server, start_app, endpoint = _serve(procs, tmp_path)
    app = start_app()
    unfinished = inspect_pb2.ListCallsRequest(
        states=UNFINISHED, top_level_only=True, omit_payloads=True
    )
    async with (
        Client(
            api_key=server.api_key, api_url=server.api_url, endpoint_url=endpoint, env={}
        ) as client,
        InspectClient(server.api_url, server.api_key) as inspect,
    ):
        (dispatch_id,) = await client.dispatch([Call("chain", (3000,))])
        await asyncio.sleep(1.0)
        running = [c.dispatch_id for c in (await inspect.list_calls(unfinished)).calls]
        assert running == [dispatch_id], "the kill must hit the chain mid-way"
        app.kill()
        # A new interpreter: the caller is not held live there, so the resume that
        # comes with the next child is not run; the caller's own resume asks for the
        # whole journal and replays, and the steps after are one batch each again.
        app = start_app()
        info = await inspect.wait_call(dispatch_id, 120)
        assert info.state == inspect_pb2.CALL_STATE_DONE, info
        assert decode_value(info.result.output) == 3000, info
        seen, _ = await _call(client, inspect, "requests_seen")  # type: ignore[misc]
    plain, batches = seen.get(RUN, 0), seen.get(BATCH, 0)
    assert plain <= 5, seen  # a few around the replay, and requests_seen's own
    assert batches >= 100, seen  # the steps left after the kill (about 2,000 here)
    assert app.poll() is None, app.dump()
