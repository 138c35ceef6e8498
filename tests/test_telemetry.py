"""OpenTelemetry: a fan-out is one trace, with a span per call and per attempt on both sides.

The application runs in a new interpreter that installs the SDK's in-memory exporter and
metric reader as its global providers (they can be set once per process), with a
scheduler served over HTTP and the app's endpoint in the same process. It prints what
was exported as JSON.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import json
    import sys

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    from dispatch_aio import Call, Dispatch
    from dispatch_aio.scheduler import Scheduler


    async def main(cache_size: int) -> None:
        async with Scheduler(":memory:", api_key="key") as scheduler:
            url = await scheduler.serve("127.0.0.1", 0)
            dispatch = Dispatch(
                api_url=url,
                api_key="key",
                verification_key=scheduler.verification_key,
                endpoint_addr="127.0.0.1:0",
                env={},
                cache_size=cache_size,
            )

            @dispatch.function(name="square")
            async def square(x: int) -> int:
                return x * x

            @dispatch.function(name="fanout")
            async def fanout(n: int) -> int:
                first = await square(n)  # a step before the gather, replayed after it
                return first + sum(await asyncio.gather(*(square(i) for i in range(n))))

            async with await dispatch.start() as server:
                with trace.get_tracer("app").start_as_current_span("request"):
                    call = Call(fanout.name, (3,), endpoint=server.url)
                    (dispatch_id,) = await dispatch.client.dispatch([call])
                result = await dispatch.client.result(dispatch_id, timeout=30)
        spans = [
            {
                "name": s.name,
                "trace": s.context.trace_id,
                "id": s.context.span_id,
                "parent": s.parent.span_id if s.parent else None,
                "attributes": dict(s.attributes),
                "error": not s.status.is_ok,
            }
            for s in exporter.get_finished_spans()
        ]
        points = {}
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points[metric.name] = [
                        [dict(p.attributes), getattr(p, "value", None), getattr(p, "count", None)]
                        for p in metric.data.data_points
                    ]
        print(json.dumps({"result": result, "spans": spans, "metrics": points}))


    asyncio.run(main(int(sys.argv[1])))
    """
)


def run(cache_size: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_size)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("cache_size", [1024, 0], ids=["live", "replayed"])
def test_a_fan_out_is_one_trace_with_a_span_per_call_and_attempt(cache_size: int) -> None:
    out = run(cache_size)
    assert out["result"] == 9 + 0 + 1 + 4
    spans = out["spans"]
    by_id = {s["id"]: s for s in spans}
    names = collections.Counter(s["name"] for s in spans)
    # One trace, from the span the call was submitted in.
    (request,) = [s for s in spans if s["name"] == "request"]
    assert {s["trace"] for s in spans} == {request["trace"]}
    # A span per call, whatever the replays: the fan-out and its four squares.
    assert names["dispatch.call fanout"] == 1 and names["dispatch.call square"] == 4
    # A span per attempt on each side: the scheduler's, and the endpoint's run below it.
    assert names["dispatch.attempt square"] == names["dispatch.run square"] == 4
    runs = names["dispatch.run fanout"]
    assert names["dispatch.attempt fanout"] == runs >= 3  # the input, then two resumes

    def parent(span: dict[str, Any]) -> dict[str, Any]:
        return by_id[span["parent"]]  # type: ignore[no-any-return]

    for span in spans:
        name, attributes = span["name"], span["attributes"]
        if name.startswith("dispatch."):
            function = name.split()[1]
            assert attributes["dispatch_aio.function"] == function
            assert attributes["dispatch_aio.dispatch_id"]
            assert not span["error"]
        if name.startswith("dispatch.run "):
            attempt = parent(span)
            assert attempt["name"] == name.replace("run", "attempt")
            assert (
                attempt["attributes"]["dispatch_aio.dispatch_id"]
                == (attributes["dispatch_aio.dispatch_id"])
            )
            assert (
                attributes["dispatch_aio.attempt"] == attempt["attributes"]["dispatch_aio.attempt"]
            )
            assert attributes["dispatch_aio.status"] == "ok"
        elif name in ("dispatch.attempt fanout", "dispatch.call fanout"):
            assert parent(span) is request
        elif name in ("dispatch.attempt square", "dispatch.call square"):
            assert parent(span)["name"] == "dispatch.run fanout"  # the run that made it
        if name.startswith("dispatch.call "):
            assert attributes["dispatch_aio.status"] == "ok"

    metrics = out["metrics"]
    finished = {a["dispatch_aio.function"]: v for a, v, _ in metrics["dispatch_aio.calls.finished"]}
    assert finished == {"fanout": 1, "square": 4}
    started = {a["dispatch_aio.function"]: v for a, v, _ in metrics["dispatch_aio.calls.started"]}
    assert started == {"fanout": 1, "square": 4}
    assert sum(c for _, _, c in metrics["dispatch_aio.attempt.duration"]) == 4 + runs
    assert [v for _, v, _ in metrics["dispatch_aio.calls.unfinished"]] == [0]


def test_nothing_of_opentelemetry_is_imported_until_the_program_does() -> None:
    # The API often comes installed unused (FastAPI requires it): importing it would cost
    # every process time and memory.
    code = (
        "import sys, dispatch_aio, dispatch_aio.scheduler, dispatch_aio.testing\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
