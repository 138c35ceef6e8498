"""Inspecting a running scheduler: the InspectService client and the ``calls``/``show`` views."""

from __future__ import annotations

__all__ = [
    "STATES",
    "STATUSES",
    "CallNotFoundError",
    "InspectClient",
    "InspectError",
    "call_to_json",
    "render_calls",
    "render_tree",
    "state_name",
]

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Self, TypeVar

import aiohttp
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from .. import __version__
from .._policy import describe_policy
from .._status import Status
from ..proto.sdk.v1 import call_pb2, dispatch_pb2
from ..proto.v1 import control_pb2, inspect_pb2
from ._console import Console, Style
from ._format import (
    describe_input,
    describe_result,
    format_duration,
    plural,
    shorten,
)

_M = TypeVar("_M", bound=Message)

_PREFIX = "/dispatch_aio.v1.InspectService/"
_CONTROL_PREFIX = "/dispatch_aio.v1.ControlService/"
_DISPATCH_PREFIX = "/dispatch.sdk.v1.DispatchService/"

STATES: Mapping[str, inspect_pb2.CallState.ValueType] = MappingProxyType(
    {
        "pending": inspect_pb2.CALL_STATE_PENDING,
        "running": inspect_pb2.CALL_STATE_RUNNING,
        "suspended": inspect_pb2.CALL_STATE_SUSPENDED,
        "done": inspect_pb2.CALL_STATE_DONE,
    }
)
"""Call states by the names the command accepts."""

STATUSES: Mapping[str, int] = MappingProxyType(
    {status.name.lower(): int(status) for status in Status if status is not Status.UNSPECIFIED}
)
"""Final statuses by the names the command accepts (``failed`` means any but ``ok``)."""

_OK: int = Status.OK.value
_STATE_NAMES = MappingProxyType({value: name for name, value in STATES.items()})
_STATE_STYLES = MappingProxyType(
    {
        inspect_pb2.CALL_STATE_PENDING: Style.YELLOW,
        inspect_pb2.CALL_STATE_RUNNING: Style.CYAN,
        inspect_pb2.CALL_STATE_SUSPENDED: Style.BLUE,
    }
)


class InspectError(Exception):
    """The inspection API could not answer; the message says what to check."""


class CallNotFoundError(InspectError):
    """The scheduler has no call with the dispatch id asked for."""


class InspectClient:
    """Client of a local scheduler's ``dispatch_aio.v1.InspectService`` (binary protobuf).

    Args:
        api_url: The scheduler's API base URL (``DISPATCH_API_URL``).
        api_key: Its API key (``DISPATCH_API_KEY``).
        timeout: Seconds a request may take, besides the wait of `wait_call`.
    """

    def __init__(self, api_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self._url = api_url.rstrip("/")
        self._key = api_key
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def list_calls(
        self, request: inspect_pb2.ListCallsRequest
    ) -> inspect_pb2.ListCallsResponse:
        """Return one page of calls."""
        return await self._call("ListCalls", request, inspect_pb2.ListCallsResponse())

    async def iter_calls(self, request: inspect_pb2.ListCallsRequest) -> list[inspect_pb2.CallInfo]:
        """Return every matching call, following the pages."""
        copy = inspect_pb2.ListCallsRequest()
        copy.CopyFrom(request)  # the page token changes
        request = copy
        calls: list[inspect_pb2.CallInfo] = []
        while True:
            page = await self.list_calls(request)
            calls.extend(page.calls)
            if not page.next_page_token:
                return calls
            request.page_token = page.next_page_token

    async def get_call(self, dispatch_id: str, max_depth: int = 0) -> inspect_pb2.CallTree:
        """Return a call and the tree of calls below it (`max_depth` levels; 0: all).

        Raises:
            CallNotFoundError: No such call.
        """
        request = inspect_pb2.GetCallRequest(dispatch_id=dispatch_id, max_depth=max_depth)
        response = await self._call("GetCall", request, inspect_pb2.GetCallResponse())
        return response.tree

    async def wait_call(
        self, dispatch_id: str, max_wait: float | None = None
    ) -> inspect_pb2.CallInfo:
        """Wait until a call is done (or `max_wait` seconds passed) and return it.

        Raises:
            CallNotFoundError: No such call.
        """
        request = inspect_pb2.WaitCallRequest(dispatch_id=dispatch_id)
        if max_wait is not None:
            request.timeout.FromNanoseconds(round(max_wait * 1e9))
        extra = self._timeout + (max_wait if max_wait is not None else 24 * 3600.0)
        response = await self._call("WaitCall", request, inspect_pb2.WaitCallResponse(), extra)
        return response.call

    async def list_journals(self) -> list[inspect_pb2.StoredJournal]:
        """Return the journals of every unfinished call, following the pages."""
        request = inspect_pb2.ListJournalsRequest()
        journals: list[inspect_pb2.StoredJournal] = []
        while True:
            page = await self._call("ListJournals", request, inspect_pb2.ListJournalsResponse())
            journals.extend(page.journals)
            if not page.next_page_token:
                return journals
            request.page_token = page.next_page_token

    async def dispatch(self, calls: list[call_pb2.Call]) -> list[str]:
        """Submit calls (DispatchService.Dispatch); return their dispatch ids."""
        request = dispatch_pb2.DispatchRequest(
            calls=calls, idempotency_keys=[secrets.token_hex(16) for _ in calls]
        )
        response = await self._call(
            "Dispatch", request, dispatch_pb2.DispatchResponse(), prefix=_DISPATCH_PREFIX
        )
        return list(response.dispatch_ids)

    async def cancel_call(self, dispatch_id: str) -> control_pb2.CancelCallResponse:
        """Cancel a call and the unfinished calls below it (ControlService.CancelCall).

        Raises:
            CallNotFoundError: No such call.
        """
        request = control_pb2.CancelCallRequest(dispatch_id=dispatch_id)
        return await self._call(
            "CancelCall", request, control_pb2.CancelCallResponse(), prefix=_CONTROL_PREFIX
        )

    async def _call(
        self,
        method: str,
        request: Message,
        response: _M,
        total: float = 0,
        *,
        prefix: str = _PREFIX,
    ) -> _M:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = self._url + prefix + method
        headers = {
            "Content-Type": "application/proto",
            "Authorization": f"Bearer {self._key}",
            "User-Agent": f"dispatch-aio/{__version__}",
        }
        timeout = aiohttp.ClientTimeout(total=total or self._timeout)
        try:
            async with self._session.post(
                url, data=request.SerializeToString(), headers=headers, timeout=timeout
            ) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:
            raise InspectError(f"the scheduler at {self._url} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise InspectError(
                f"cannot reach the scheduler at {self._url} ({exc}): is `dispatch-aio server` "
                "or `dispatch-aio run` running? Check --api-url (or DISPATCH_API_URL)"
            ) from None
        if status != 200:
            raise self._error(status, body)
        try:
            response.ParseFromString(body)
        except DecodeError:
            raise InspectError(
                f"{self._url} answered {method} with something that is not a protobuf message: "
                "is it a dispatch-aio scheduler? Check --api-url (or DISPATCH_API_URL)"
            ) from None
        return response

    def _error(self, status: int, body: bytes) -> InspectError:
        code, message = "", body[:300].decode("utf-8", "replace")
        try:
            data = json.loads(body)
            code, message = str(data.get("code", "")), str(data.get("message", message))
        except (ValueError, AttributeError):
            pass
        if status == 401:
            return InspectError(
                f"the scheduler at {self._url} rejected the API key: pass the key it was "
                "started with (printed by `dispatch-aio server`) with --api-key or "
                "DISPATCH_API_KEY"
            )
        if status == 404 and code == "not_found":
            return CallNotFoundError(message)
        if status == 404:
            return InspectError(
                f"{self._url} does not serve the inspection API: it is not a dispatch-aio "
                "scheduler; check --api-url (or DISPATCH_API_URL)"
            )
        return InspectError(f"the scheduler at {self._url} answered HTTP {status}: {message}")

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- views ------------------------------------------------------------------------------


def _seconds(stamp: object) -> float:
    return float(stamp.ToNanoseconds()) / 1e9  # type: ignore[attr-defined]


def _elapsed(info: inspect_pb2.CallInfo, now: float) -> float:
    end = _seconds(info.finish_time) if info.HasField("finish_time") else now
    return end - _seconds(info.creation_time)


def _when(info: inspect_pb2.CallInfo, now: float) -> str:
    created = datetime.fromtimestamp(_seconds(info.creation_time))
    today = datetime.fromtimestamp(now).date()
    fmt = "%H:%M:%S" if created.date() == today else "%Y-%m-%d %H:%M:%S"
    return created.strftime(fmt)


def state_name(info: inspect_pb2.CallInfo) -> str:
    """The state of a call as the table shows it: pending ... ok, a status, cancelled."""
    if info.cancelled:
        return "cancelled"
    if info.state != inspect_pb2.CALL_STATE_DONE:
        return _STATE_NAMES.get(info.state, "unknown")
    return "ok" if info.status == _OK else _status_name(info.status)


def _state(info: inspect_pb2.CallInfo, console: Console) -> str:
    name = state_name(info)
    if info.cancelled:
        return console.paint(name, Style.YELLOW)
    if info.state != inspect_pb2.CALL_STATE_DONE:
        return console.paint(name, _STATE_STYLES.get(info.state, Style.PLAIN))
    return console.paint(name, Style.GREEN if info.status == _OK else Style.RED)


def _status_name(status: int) -> str:
    try:
        return Status(status).name.lower()
    except ValueError:
        return f"status {status}"


def _attempts(info: inspect_pb2.CallInfo) -> int:
    # Run requests that did not end in a poll: the first run, retries, tail calls.
    return max(info.attempts - info.polls, 1 if info.attempts else 0)


def render_calls(
    calls: Iterable[inspect_pb2.CallInfo],
    console: Console,
    *,
    children: Iterable[bool] | None = None,
) -> list[str]:
    """Return the lines of a table of calls.

    Args:
        calls: The calls, in order.
        console: For colours.
        children: For each call, whether to mark it as made by the call above it.
    """
    now = time.time()
    header = ("ID", "FUNCTION", "STATE", "ATTEMPTS", "CHILDREN", "CREATED", "DURATION")
    rows: list[tuple[str, ...]] = [header]
    states: list[inspect_pb2.CallInfo | None] = [None]
    calls = list(calls)
    marks = list(children) if children is not None else [False] * len(calls)
    for info, child in zip(calls, marks, strict=True):
        rows.append(
            (
                info.dispatch_id,
                ("\u2514\u2500 " if child else "") + shorten(info.function, 40),
                state_name(info) + _diverged(info),
                str(_attempts(info)),
                str(info.child_count),
                _when(info, now),
                format_duration(_elapsed(info, now)),
            )
        )
        states.append(info)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row, call in zip(rows, states, strict=True):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        if call is not None:  # colour after padding: escape codes have no width
            painted = _state(call, console)
            if call.divergences:
                painted += console.paint(_diverged(call), Style.YELLOW)
            cells[2] = painted + " " * (widths[2] - len(row[2]))
        lines.append("  ".join(cells).rstrip())
    return lines


def _diverged(info: inspect_pb2.CallInfo) -> str:
    """A mark beside the state of a call whose runs diverged from their journal."""
    return f" (diverged {info.divergences}x)" if info.divergences else ""


def call_to_json(info: inspect_pb2.CallInfo) -> str:
    """Return a call as one line of JSON (the protobuf JSON form of CallInfo)."""
    return json.dumps(
        json_format.MessageToDict(info, preserving_proto_field_name=True), sort_keys=True
    )


def render_tree(
    tree: inspect_pb2.CallTree, console: Console, *, max_children: int = 20
) -> list[str]:
    """Return the lines showing a call tree: statuses, attempts, timings and payloads.

    The top call's input, output and error are shown in full, with the traceback of its
    error; those of the calls below it are cut to one short line.

    Args:
        tree: The tree (`InspectClient.get_call`).
        console: For colours.
        max_children: Children shown per call (0: all); the others are summarised.
    """
    lines: list[str] = []
    _node(tree, console, time.time(), "", "", lines, max_children, top=True)
    return lines


def _node(
    tree: inspect_pb2.CallTree,
    console: Console,
    now: float,
    lead: str,
    indent: str,
    lines: list[str],
    max_children: int,
    *,
    top: bool = False,
) -> None:
    info = tree.call
    timing = format_duration(_elapsed(info, now))
    if info.state != inspect_pb2.CALL_STATE_DONE:
        timing = f"for {timing}"
    parts = [plural(_attempts(info), "attempt")]
    if info.polls:
        parts.append(plural(info.polls, "poll"))
    if info.divergences:
        parts.append(console.paint(plural(info.divergences, "divergence"), Style.YELLOW))
    if info.version:
        parts.append(f"version {info.version}")
    parts.append(timing)
    name = console.paint(info.function, Style.BOLD)
    lines.append(
        f"{lead}{name}  {_state(info, console)}  ({', '.join(parts)})  "
        f"{console.paint(info.dispatch_id, Style.DIM)}"
    )
    children = list(tree.children)
    detail = indent + ("\u2502  " if children else "   ")
    limit = 0 if top else 100
    if info.HasField("input"):
        lines.append(f"{detail}input:  {describe_input(info.input, limit)}")
    if info.state == inspect_pb2.CALL_STATE_DONE:
        result = info.result
        if result.HasField("error") or info.status != _OK:
            error = describe_result(result, info.status, limit)
            lines.append(f"{detail}error:  {console.paint(error, Style.RED)}")
            trace = result.error.traceback.decode("utf-8", "replace").rstrip()
            if top and trace:
                lines.extend(f"{detail}  {line}" for line in trace.splitlines())
        else:
            lines.append(f"{detail}output: {describe_result(result, info.status, limit)}")
    else:
        if info.last_error:
            failure = shorten(info.last_error, limit)
            lines.append(f"{detail}last attempt: {console.paint(failure, Style.YELLOW)}")
        if info.HasField("due_time"):
            lines.append(f"{detail}{_due(info, now)}")
        if top and info.HasField("expiration_time"):
            left = _seconds(info.expiration_time) - now
            lines.append(f"{detail}expires in {format_duration(left)}")
    if top and info.HasField("policy") and (policy := describe_policy(info.policy)):
        lines.append(f"{detail}policy: {policy}")
    if top and info.attempt_log:
        lines.append(f"{detail}requests:")
        lines.extend(f"{detail}  {line}" for line in _attempt_lines(info, console))
    shown = children if not max_children else children[:max_children]
    hidden = children[len(shown) :]
    for i, child in enumerate(shown):
        last = i == len(shown) - 1 and not hidden
        branch = indent + ("\u2514\u2500 " if last else "\u251c\u2500 ")
        _node(
            child,
            console,
            now,
            branch,
            indent + ("   " if last else "\u2502  "),
            lines,
            max_children,
        )
    if hidden:
        lines.append(f"{indent}\u2514\u2500 ... {_summary(hidden)} (--all shows them)")


def _clock(seconds: float, now: float) -> str:
    moment = datetime.fromtimestamp(seconds)
    same_day = moment.date() == datetime.fromtimestamp(now).date()
    return moment.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S")


def _due(info: inspect_pb2.CallInfo, now: float) -> str:
    """When a waiting call runs next: a suspended one wakes, a failed attempt is retried."""
    due = _seconds(info.due_time)
    when = f"at {_clock(due, now)} (in {format_duration(due - now)})"
    if info.state == inspect_pb2.CALL_STATE_SUSPENDED:
        return f"wakes {when}" + (", or when its calls return" if info.child_count else "")
    return f"next attempt {when}"


def _attempt_lines(info: inspect_pb2.CallInfo, console: Console) -> list[str]:
    """One line per Run request: number, time, outcome and how long it took."""
    now = time.time()
    lines = []
    for attempt in info.attempt_log:
        took = _seconds(attempt.finish_time) - _seconds(attempt.start_time)
        failed = attempt.status not in (_OK, 0)
        outcome = console.paint(attempt.outcome, Style.RED if failed else Style.PLAIN)
        lines.append(
            f"{attempt.number:>3}. {_clock(_seconds(attempt.start_time), now)}  {outcome}  "
            f"({format_duration(took)})"
        )
    return lines


def _summary(hidden: list[inspect_pb2.CallTree]) -> str:
    counts: dict[str, int] = {}
    for child in hidden:
        key = state_name(child.call)
        counts[key] = counts.get(key, 0) + 1
    detail = ", ".join(f"{n} {key}" for key, n in sorted(counts.items()))
    return f"{plural(len(hidden), 'more call')}: {detail}"
