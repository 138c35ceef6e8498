"""OpenTelemetry traces and metrics of calls, when the program uses OpenTelemetry.

Install the ``otel`` extra (``pip install 'dispatch-aio[otel]'``) and configure a
tracer and meter provider as for any OpenTelemetry program. This module imports
nothing of OpenTelemetry until the program has (a provider cannot be set otherwise),
and makes no span until a tracer provider is set: until then every function here
does nothing.

A call carries the trace context it was made in (``Call.trace_context``, W3C Trace
Context fields): `dispatch()` takes the current one, and a durable function's calls
take the span of the run that made them. The scheduler keeps it with the call, and
each attempt's Run request carries the context of the scheduler's attempt span
(``RunRequest.trace_context``), under which the endpoint makes its run span. So a
fan-out is one trace: the caller's span, the scheduler's attempt span, the endpoint's
run span, and below it the same for each call the run made.

Spans (attributes ``dispatch_aio.function``, ``dispatch_aio.dispatch_id``,
``dispatch_aio.attempt``, ``dispatch_aio.status``):

- ``dispatch.run <function>`` (endpoint, SERVER): one Run request, a first run or a
  resume. A resumed durable function replays its journal inside it without making new
  spans for the calls and steps already done: they were sent and recorded before.
- ``dispatch.attempt <function>`` (scheduler, CLIENT): one Run request sent, from the
  request to the outcome recorded.
- ``dispatch.call <function>`` (scheduler, INTERNAL): a call from its creation to its
  end, made when it ends, under the context the call was made in.

Metrics (meter ``dispatch_aio``): ``dispatch_aio.calls.started`` and
``dispatch_aio.calls.finished`` (counters, by function, and status for the latter),
``dispatch_aio.calls.unfinished`` (up-down counter: the scheduler's queue depth) and
``dispatch_aio.attempt.duration`` (histogram, seconds, by function and status).
"""

from __future__ import annotations

__all__ = [
    "AttemptSpan",
    "SchedulerTelemetry",
    "current_carrier",
    "decode_carrier",
    "encode_carrier",
    "run_span",
    "stamp_calls",
]

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from ._status import Status
from .proto.sdk.v1 import call_pb2, function_pb2

_NAME = "dispatch_aio"


def _version() -> str:
    from . import __version__  # the package imports this module

    return __version__


def _imported(module: str) -> ModuleType | None:
    """An OpenTelemetry module, if the program imported OpenTelemetry itself.

    A provider can only have been set by code that imported the API, so until then
    this module imports nothing: ``opentelemetry-api`` is often installed unused (it
    comes with FastAPI), and importing it costs every process time and memory.
    """
    if module not in sys.modules:
        return None
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def _tracer_api() -> tuple[Any, Any] | None:
    """The ``trace`` and ``propagate`` modules when spans go somewhere, else None.

    Checked at each use (a provider may be set at any time); until one is set, the
    API's proxy provider would only make spans that record nothing.
    """
    trace = _imported("opentelemetry.trace")
    if trace is None or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    propagate = _imported("opentelemetry.propagate")
    if propagate is None:
        propagate = __import__("opentelemetry.propagate", fromlist=["_"])
    return trace, propagate


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C fields; empty when nothing is traced."""
    api = _tracer_api()
    if api is None:
        return {}
    carrier: dict[str, str] = {}
    api[1].inject(carrier)
    return carrier


def encode_carrier(carrier: Mapping[str, str]) -> str:
    """The form a call's trace context is stored in ("" for none)."""
    return json.dumps(dict(sorted(carrier.items())), separators=(",", ":")) if carrier else ""


def decode_carrier(text: str) -> dict[str, str]:
    """Read back what `encode_carrier` stored (nothing if it is damaged)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def stamp_calls(calls: Sequence[call_pb2.Call], carrier: Mapping[str, str]) -> None:
    """Give the calls a run made the trace context of that run (unless they have one)."""
    if not carrier:
        return
    for call in calls:
        if not call.trace_context:
            call.trace_context.update(carrier)


def _status_name(status: int) -> str:
    try:
        return Status(status).name.lower()
    except ValueError:
        return str(status)


@contextlib.contextmanager
def run_span(request: function_pb2.RunRequest, attempt: int) -> Iterator[_RunSpan]:
    """Make the endpoint's span of one Run request, current while the run goes on."""
    api = _tracer_api()
    if api is None:
        yield _RunSpan(None, None)
        return
    trace, propagate = api
    attributes: dict[str, Any] = {
        "dispatch_aio.function": request.function,
        "dispatch_aio.dispatch_id": request.dispatch_id,
        "dispatch_aio.directive": request.WhichOneof("directive") or "",
    }
    if attempt:
        attributes["dispatch_aio.attempt"] = attempt
    with trace.get_tracer(_NAME, _version()).start_as_current_span(
        f"dispatch.run {request.function}",
        context=propagate.extract(dict(request.trace_context)),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=True,
    ) as span:
        yield _RunSpan(span, api)


class _RunSpan:
    """The endpoint's span of a run, to record the run's answer on."""

    def __init__(self, span: Any, api: tuple[Any, Any] | None) -> None:
        self._span = span
        self._api = api

    def answered(self, response: function_pb2.RunResponse) -> None:
        """Record the answer, and give the calls it makes the run's trace context."""
        if self._span is None or self._api is None:
            return
        trace, propagate = self._api
        self._span.set_attribute("dispatch_aio.status", _status_name(response.status))
        directive = response.WhichOneof("directive") or ""
        self._span.set_attribute("dispatch_aio.answer", directive)
        if int(response.status) not in (Status.OK, Status.UNSPECIFIED):
            self._span.set_status(trace.StatusCode.ERROR, _status_name(response.status))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        if directive == "poll":
            stamp_calls(response.poll.calls, carrier)
        elif directive == "exit" and response.exit.HasField("tail_call"):
            stamp_calls([response.exit.tail_call], carrier)


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptSpan:
    """The scheduler's span of one attempt (no span when nothing is traced)."""

    span: Any
    function: str
    started: float
    api: tuple[Any, Any] | None = None

    def carrier(self) -> dict[str, str]:
        """The context the Run request carries: this span's."""
        if self.span is None or self.api is None:
            return {}
        trace, propagate = self.api
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier


@dataclasses.dataclass(frozen=True, slots=True)
class _Instruments:
    started: Any
    finished: Any
    unfinished: Any
    duration: Any


class SchedulerTelemetry:
    """The scheduler's spans and metrics; nothing until the program uses OpenTelemetry."""

    def __init__(self) -> None:
        self._instruments: _Instruments | None = None
        self._unreported = 0  # unfinished calls counted before the instruments existed

    def _meter(self) -> _Instruments | None:
        """The instruments, made once the program imported the metrics API."""
        if self._instruments is None:
            metrics = _imported("opentelemetry.metrics")
            if metrics is None:
                return None
            meter = metrics.get_meter(_NAME, _version())
            self._instruments = _Instruments(
                meter.create_counter(
                    "dispatch_aio.calls.started", unit="{call}", description="Calls created"
                ),
                meter.create_counter(
                    "dispatch_aio.calls.finished",
                    unit="{call}",
                    description="Calls ended, by status",
                ),
                meter.create_up_down_counter(
                    "dispatch_aio.calls.unfinished",
                    unit="{call}",
                    description="Calls not ended yet: the scheduler's queue depth",
                ),
                meter.create_histogram(
                    "dispatch_aio.attempt.duration",
                    unit="s",
                    description="Time from a Run request sent to its outcome",
                ),
            )
            if self._unreported:
                self._instruments.unfinished.add(self._unreported)
        return self._instruments

    def created(self, function: str, count: int = 1) -> None:
        """Calls were created (committed)."""
        meter = self._meter()
        if meter is not None:
            meter.started.add(count, {"dispatch_aio.function": function})

    def loaded(self, count: int) -> None:
        """Unfinished calls the scheduler took up (created, or loaded at its start)."""
        self._unfinished(count)

    def let_go(self, count: int = 1) -> None:
        """Unfinished calls the scheduler no longer drives (ended, or moved away)."""
        self._unfinished(-count)

    def _unfinished(self, change: int) -> None:
        meter = self._meter()
        if meter is None:
            self._unreported += change  # reported once the instruments exist
        elif change:
            meter.unfinished.add(change)

    def traces(self) -> bool:
        """Whether attempts get spans (the program set a tracer provider)."""
        return _tracer_api() is not None

    def attempt(
        self, function: str, dispatch_id: str, number: int, context: str, started: float
    ) -> AttemptSpan:
        """Start the span of an attempt, under the context the call was made in."""
        api = _tracer_api()
        if api is None:
            return AttemptSpan(None, function, started)
        trace, propagate = api
        span = trace.get_tracer(_NAME, _version()).start_span(
            f"dispatch.attempt {function}",
            context=propagate.extract(decode_carrier(context)),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "dispatch_aio.function": function,
                "dispatch_aio.dispatch_id": dispatch_id,
                "dispatch_aio.attempt": number,
            },
            start_time=round(started * 1e9),
        )
        return AttemptSpan(span, function, started, api)

    def attempted(self, attempt: AttemptSpan, status: int, error: str, ended: float) -> None:
        """End an attempt's span with its outcome."""
        meter = self._meter()
        if meter is None and attempt.span is None:
            return  # nothing observes it (the common case: cheap)
        name = _status_name(status)
        if meter is not None:
            labels = {"dispatch_aio.function": attempt.function, "dispatch_aio.status": name}
            meter.duration.record(max(ended - attempt.started, 0.0), labels)
        if attempt.span is None or attempt.api is None:
            return
        span = attempt.span
        span.set_attribute("dispatch_aio.status", name)
        if status not in (Status.OK, Status.UNSPECIFIED):
            span.set_status(attempt.api[0].StatusCode.ERROR, error or name)
        span.end(end_time=round(ended * 1e9))

    def finished(
        self,
        function: str,
        dispatch_id: str,
        context: str,
        status: int,
        error: str,
        created: float,
        ended: float,
    ) -> None:
        """A call ended: its span, from its creation, and the counters."""
        meter = self._meter()
        api = _tracer_api()
        if meter is None and api is None:
            return  # nothing observes it (the common case: cheap)
        name = _status_name(status)
        if meter is not None:
            meter.finished.add(1, {"dispatch_aio.function": function, "dispatch_aio.status": name})
        if api is None:
            return
        trace, propagate = api
        span = trace.get_tracer(_NAME, _version()).start_span(
            f"dispatch.call {function}",
            context=propagate.extract(decode_carrier(context)),
            attributes={
                "dispatch_aio.function": function,
                "dispatch_aio.dispatch_id": dispatch_id,
                "dispatch_aio.status": name,
            },
            start_time=round(created * 1e9),
        )
        if status != Status.OK:
            span.set_status(trace.StatusCode.ERROR, error or name)
        span.end(end_time=round(ended * 1e9))
