"""The scheduler's web UI: static pages at ``/ui/`` and the JSON they read at ``/ui/api/``.

The pages are plain files of the package (``ui/index.html``, ``ui.js``, ``ui.css``) and
hold no data. They read it from JSON endpoints that require the API key, like every RPC
of the scheduler: the address printed at start-up is ``<api url>/ui/#key=<api key>``,
whose fragment never reaches the server; the script keeps the key in the tab's
``sessionStorage`` and sends it as ``Authorization: Bearer <key>``.

- ``GET /ui/api/calls``: a page of calls, newest first. Query parameters: ``state``
  (repeatable: pending, running, suspended, done), ``status`` (a status name, or
  ``failed`` for any but ok), ``function`` (a substring), ``since``/``until`` (unix
  seconds of creation), ``top`` (1: top-level calls only), ``limit`` and ``before`` (the
  ``next`` of the previous page).
- ``GET /ui/api/calls/{id}``: one call in full (input, output, error and traceback, the
  steps of its journal when the scheduler keeps it) and the tree of calls it belongs to,
  from its root, with the times of each for a timeline.
- ``POST /ui/api/calls/{id}/cancel``: cancel the call and its descendants, as
  ``dispatch-aio cancel``; answers ``{"cancelled": bool, "stopped": n}``.
- ``POST /ui/api/events`` with ``{"key": ..., "value": <JSON>}`` or ``{"key": ...,
  "error": "message"}``: resolve a durable event, as ``dispatch-aio send-event``; answers
  ``{"woken": n}``.
- ``GET /ui/api/schedules``: the schedules; ``POST /ui/api/schedules/{id}/pause`` (or
  ``resume``) pauses or resumes one, as ``dispatch-aio schedule pause``.

The key travels in a header, never in a cookie, so another site cannot make a browser
send these requests.

Values are previewed here, without unpickling (see `_preview`): the pages show text, and
the scheduler never runs code of the application.
"""

from __future__ import annotations

__all__ = ["UI_PATH", "add_ui_routes", "ui_address"]

import dataclasses
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from .._codec import encode_error, encode_value
from .._policy import describe_policy
from .._status import Status
from ..errors import PermanentError
from ..proto.sdk.v1 import call_pb2, error_pb2
from ..proto.v1 import journal_pb2, policy_pb2, schedule_pb2
from ._engine import Engine, EngineClosedError, InvalidCallError, is_cancelled
from ._events import EventAlreadyResolvedError
from ._preview import preview_input, preview_pickle, preview_value
from .store import CallQuery, CallRecord, Phase, StateKind, Store, StoreError

if TYPE_CHECKING:
    from ._schedules import Schedules

UI_PATH = "/ui/"
"""Where the UI is served, below the API's base URL."""

_FILES: Mapping[str, str] = MappingProxyType(
    {"index.html": "text/html", "ui.js": "text/javascript", "ui.css": "text/css"}
)
# The pages load only their own files and talk only to this server; no inline script
# runs, so even a value that slipped into the page as markup could not execute.
_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
)
# The states a call may be filtered by, and the stored phases of each (a running call
# is stored PENDING or SUSPENDED: RUNNING is known only in memory).
_STATES: Mapping[str, tuple[Phase, ...]] = MappingProxyType(
    {
        "pending": (Phase.PENDING,),
        "running": (Phase.PENDING, Phase.SUSPENDED),
        "suspended": (Phase.SUSPENDED,),
        "done": (Phase.DONE,),
    }
)
_PAGE = 50
_MAX_PAGE = 500
_SCAN = 1000
"""Rows read per store query while a page is looked for."""
_MAX_TREE = 2000
"""Calls of a tree sent at most; the others are counted, not listed."""
_MAX_DEPTH = 100
"""Levels of a tree sent at most (JSON encoders recurse)."""
_SHORT = 160
_LONG = 20_000
_MAX_STEPS = 1000
_MAX_ATTEMPTS = 200  # the latest Run requests of a call shown

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ui_address(api_url: str, api_key: str) -> str:
    """Return the address that opens the UI signed in: ``<api_url>/ui/#key=<api_key>``.

    Args:
        api_url: The scheduler's API base URL (``Scheduler.url``).
        api_key: Its API key; it travels in the fragment, which browsers never send.
    """
    return f"{api_url.rstrip('/')}{UI_PATH}#key={quote(api_key, safe='')}"


def add_ui_routes(
    app: web.Application,
    engine: Engine,
    store: Store,
    *,
    api_key: str,
    schedules: Schedules | None = None,
) -> None:
    """Serve the web UI on `app` at ``/ui/``.

    Args:
        app: The scheduler's application (`create_app`), not started yet.
        engine: The engine, for the calls being run now.
        store: The store the calls are read from.
        api_key: The key the UI's data requests must carry.
        schedules: The scheduler's schedules, when its store keeps them.
    """
    files = {
        name: (resources.files(__package__ or "dispatch_aio.scheduler") / "ui" / name).read_bytes()
        for name in _FILES
    }
    api = _UiApi(engine, store, api_key, schedules)

    async def static(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in files:
            raise web.HTTPNotFound
        return web.Response(body=files[name], content_type=_FILES[name], headers=_HEADERS)

    async def to_slash(request: web.Request) -> web.Response:
        raise web.HTTPFound(UI_PATH)

    ui = web.Application(middlewares=[_json_errors])
    ui.add_routes(
        [
            web.get("/", static),
            web.get("/api/calls", api.list_calls),
            web.get("/api/calls/{dispatch_id}", api.get_call),
            web.post("/api/calls/{dispatch_id}/cancel", api.cancel),
            web.post("/api/events", api.send_event),
            web.get("/api/schedules", api.list_schedules),
            web.post("/api/schedules/{schedule_id}/{action:pause|resume}", api.pause_schedule),
            web.get("/{name}", static),
        ]
    )
    app.router.add_get(UI_PATH.rstrip("/"), to_slash)
    app.add_subapp(UI_PATH.rstrip("/"), ui)


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StoreError as exc:
        return _error(503, f"the scheduler's database failed: {exc}")
    except web.HTTPNotFound:
        return _error(404, f"no page at {request.path}: the UI is at {UI_PATH}")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=_HEADERS)


class _BadRequest(Exception):
    pass


class _UiApi:
    def __init__(
        self, engine: Engine, store: Store, api_key: str, schedules: Schedules | None
    ) -> None:
        self._engine = engine
        self._store = store
        self._api_key = api_key.encode()
        self._schedules = schedules

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), self._api_key)
        return scheme.lower() == "bearer" and valid

    def _unauthorized(self) -> web.Response:
        return _error(
            401,
            "missing or invalid API key: open the address the scheduler printed "
            "(it ends with #key=...), or enter the key (DISPATCH_API_KEY)",
        )

    async def list_calls(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            page = _ListFilter.parse(request.query)
        except _BadRequest as exc:
            return _error(400, str(exc))
        # Newest first, from the page's end back, until a match beyond the page shows
        # that there is more: the store reads what the page needs, not every call.
        found: list[tuple[int, CallRecord]] = []
        query = CallQuery(
            phases=page.phases,
            statuses=page.statuses,
            parent_id="" if page.top else None,
            before=page.before,
            newest_first=True,
            limit=_SCAN,
        )
        while len(found) <= page.limit:
            rows = await self._store.list_calls(query)
            found.extend(row for row in rows if page.matches(row[1], self._state(row[1])))
            if len(rows) < _SCAN:
                break
            query = dataclasses.replace(query, before=rows[-1][0])
        more = len(found) > page.limit
        found = found[: page.limit]
        counts = await self._store.count_children([rec.id for _, rec in found])
        calls = []
        for _, rec in found:
            row = self._summary(rec, counts.get(rec.id, 0))
            row.update(self._payloads(rec, _SHORT, traceback=False))
            calls.append(row)
        body = {
            "calls": calls,
            "next": str(found[-1][0]) if more and found else "",
            "now": time.time(),
        }
        return web.json_response(body, headers=_HEADERS)

    async def cancel(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        dispatch_id = request.match_info["dispatch_id"]
        try:
            stopped = await self._engine.cancel(dispatch_id)
        except LookupError:
            return _error(404, f"no call with dispatch id {dispatch_id!r}")
        except EngineClosedError as exc:
            return _error(503, str(exc))
        body = {"cancelled": stopped is not None, "stopped": stopped or 0}
        return web.json_response(body, headers=_HEADERS)

    async def send_event(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = await request.json()
        except ValueError:
            body = None
        key = body.get("key") if isinstance(body, dict) else None
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(key, str) or not (error is None or isinstance(error, str)):
            return _error(
                400, 'send {"key": "...", "value": <any JSON>} or {"key": "...", "error": "..."}'
            )
        result = call_pb2.CallResult()
        if error is not None:  # raised at the waiters' await, as send-event --error does
            result.error.CopyFrom(encode_error(PermanentError(error)))
        else:
            result.output.CopyFrom(encode_value(body.get("value")))
        try:
            woken = await self._engine.send_event(key, result)
        except EventAlreadyResolvedError as exc:
            return _error(409, str(exc))
        except InvalidCallError as exc:
            return _error(400, str(exc))
        except EngineClosedError as exc:
            return _error(503, str(exc))
        return web.json_response({"woken": woken}, headers=_HEADERS)

    async def list_schedules(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        found = self._schedules.list() if self._schedules is not None else []
        body = {"schedules": [_schedule_json(s) for s in found], "now": time.time()}
        return web.json_response(body, headers=_HEADERS)

    async def pause_schedule(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        if self._schedules is None:
            return _error(404, "this scheduler keeps no schedules")
        schedule_id = request.match_info["schedule_id"]
        try:
            if request.match_info["action"] == "pause":
                changed = await self._schedules.pause(schedule_id)
            else:
                changed = await self._schedules.resume(schedule_id)
        except LookupError as exc:
            return _error(404, str(exc))
        return web.json_response(_schedule_json(changed), headers=_HEADERS)

    async def get_call(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        dispatch_id = request.match_info["dispatch_id"]
        rec = await self._store.get_call(dispatch_id)
        if rec is None:
            return _error(404, f"no call with dispatch id {dispatch_id!r}")
        # The whole tree the call belongs to, so that the page shows it in context.
        children: dict[str, list[CallRecord]] = {}
        root = rec
        for _, member in await self._store.list_calls(CallQuery(root_id=rec.root_id)):
            if member.parent_id:
                children.setdefault(member.parent_id, []).append(member)
            elif member.id == rec.root_id:
                root = member
        detail = self._summary(rec, len(children.get(rec.id, [])))
        detail.update(self._payloads(rec, _LONG, traceback=True))
        detail["journal"] = await self._journal(rec)
        detail["policy"] = _policy_text(rec.policy)
        detail["attempts"] = [
            {
                "number": a.number,
                "started": a.started_at,
                "finished": a.finished_at,
                "status": _status_name(a.status),
                "outcome": a.outcome,
            }
            for a in (await self._store.list_attempts(rec.id))[-_MAX_ATTEMPTS:]
        ]
        body = {
            "call": detail,
            "tree": self._tree(root, children),
            "now": time.time(),
        }
        return web.json_response(body, headers=_HEADERS)

    def _tree(self, top: CallRecord, children: dict[str, list[CallRecord]]) -> dict[str, Any]:
        """The tree below `top`, at most `_MAX_TREE` calls and `_MAX_DEPTH` levels."""
        budget = _MAX_TREE
        root = self._node(top, children)
        stack = [(root, top, 1)]
        while stack:  # no recursion: a chain of calls may be thousands deep
            info, rec, depth = stack.pop()
            kids = children.get(rec.id, []) if depth < _MAX_DEPTH else []
            shown = kids[: max(budget, 0)]
            budget -= len(shown)
            nodes = [self._node(kid, children) for kid in shown]
            info["children"] = nodes
            info["hidden"] = info["child_count"] - len(nodes)
            stack.extend((node, kid, depth + 1) for node, kid in zip(nodes, shown, strict=True))
        return root

    def _node(self, rec: CallRecord, children: dict[str, list[CallRecord]]) -> dict[str, Any]:
        info = self._summary(rec, len(children.get(rec.id, [])))
        info.update(self._payloads(rec, _SHORT, traceback=False))
        return info

    def _state(self, rec: CallRecord) -> str:
        if rec.phase is not Phase.DONE:
            view = self._engine.live_view(rec.id)
            if view is not None and view[0]:
                return "running"
        return rec.phase.name.lower()

    def _summary(self, rec: CallRecord, child_count: int) -> dict[str, Any]:
        return {
            "id": rec.id,
            "parent": rec.parent_id,
            "root": rec.root_id,
            "function": rec.function,
            "endpoint": rec.endpoint,
            "version": rec.version,
            "state": self._state(rec),
            "status": _status_name(rec.status),
            "cancelled": is_cancelled(rec),
            "attempts": rec.attempts,
            "polls": rec.polls,
            "failures": rec.failures,
            "child_count": child_count,
            "created": rec.created_at,
            "updated": rec.updated_at,
            "finished": rec.finished_at,
            "expires": rec.expires_at,
            "due": rec.due_at,
            "last_error": rec.last_error,
            # Runs that diverged from their journal, in stores that count them.
            "divergences": getattr(rec, "divergences", 0),
        }

    def _payloads(self, rec: CallRecord, limit: int, *, traceback: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"input": None, "output": None, "error": None}
        if rec.input:
            out["input"] = preview_input(_any(rec.input), limit)
        if rec.phase is not Phase.DONE or not rec.result:
            return out
        try:
            result = call_pb2.CallResult.FromString(rec.result)
        except DecodeError:
            out["error"] = {"type": "", "message": "the stored result cannot be read"}
            return out
        if result.HasField("output"):
            out["output"] = preview_value(result.output, limit)
        if result.HasField("error"):
            out["error"] = _error_json(result.error, limit, traceback=traceback)
        return out

    async def _journal(self, rec: CallRecord) -> dict[str, Any] | None:
        """The steps of a suspended call's journal, when the scheduler keeps it."""
        if rec.phase is Phase.DONE:
            return None  # a finished run's journal is dropped
        data = b""
        if rec.state_kind is StateKind.SEGMENTS and self._store.keeps_segments:
            data = b"".join(await self._store.read_segments(rec.id))
        elif rec.state_kind is StateKind.TYPED:
            state = _any(rec.state)
            if state.type_url.rpartition("/")[2] != journal_pb2.Journal.DESCRIPTOR.full_name:
                return None
            data = state.value
        if not data:
            return None
        try:
            journal = journal_pb2.Journal.FromString(data)
        except DecodeError:
            return None
        return _journal_json(journal)


class _ListFilter:
    def __init__(self) -> None:
        self.phases: tuple[Phase, ...] = ()
        self.states: frozenset[str] = frozenset()
        self.statuses: tuple[int, ...] = ()
        self.failed = False
        self.function = ""
        self.since: float | None = None
        self.until: float | None = None
        self.top = False
        self.limit = _PAGE
        self.before = 0

    @classmethod
    def parse(cls, query: Any) -> _ListFilter:
        page = cls()
        states = frozenset(query.getall("state", []))
        unknown = states - _STATES.keys()
        if unknown:
            raise _BadRequest(f"unknown state {sorted(unknown)[0]!r}: use {', '.join(_STATES)}")
        page.states = states
        page.phases = tuple(sorted({phase for state in states for phase in _STATES[state]}))
        status = query.get("status", "")
        if status == "failed":
            page.failed = True
        elif status:
            try:
                page.statuses = (int(Status[status.upper()]),)
            except KeyError:
                raise _BadRequest(f"unknown status {status!r}") from None
        page.function = query.get("function", "").strip().lower()
        page.since = _number(query, "since")
        page.until = _number(query, "until")
        page.top = query.get("top", "") in ("1", "true")
        limit = _number(query, "limit")
        page.limit = min(int(limit), _MAX_PAGE) if limit and limit >= 1 else _PAGE
        before = query.get("before", "")
        if before and not (before.isascii() and before.isdigit() and len(before) < 19):
            raise _BadRequest("invalid 'before': pass the 'next' of the previous page")
        page.before = int(before) if before else 0
        return page

    def matches(self, rec: CallRecord, state: str) -> bool:
        if self.states and state not in self.states:
            return False
        if self.failed and (rec.phase is not Phase.DONE or rec.status == Status.OK):
            return False
        if self.function and self.function not in rec.function.lower():
            return False
        if self.since is not None and rec.created_at < self.since:
            return False
        return self.until is None or rec.created_at <= self.until


def _number(query: Any, name: str) -> float | None:
    text = query.get(name, "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _BadRequest(f"{name!r} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _BadRequest(f"{name!r} must be a finite number")
    return value


def _any(data: bytes) -> any_pb2.Any:
    value = any_pb2.Any()
    try:
        value.ParseFromString(data)
    except DecodeError:
        value.type_url = "invalid"
    return value


def _schedule_json(schedule: schedule_pb2.Schedule) -> dict[str, Any]:
    """A schedule as the page shows it."""
    if schedule.WhichOneof("timing") == "cron":
        timing = f"cron {schedule.cron.expression} ({schedule.cron.time_zone or 'UTC'})"
    else:
        timing = f"every {schedule.interval.ToNanoseconds() / 1e9:g} s"
    missed = schedule_pb2.MissedPolicy.Name(schedule.missed).removeprefix("MISSED_POLICY_")
    return {
        "id": schedule.id,
        "function": schedule.function,
        "input": preview_input(schedule.input, _SHORT) if schedule.HasField("input") else "()",
        "timing": timing,
        "missed": missed.lower(),
        "paused": schedule.paused,
        "next": schedule.next_firing.ToNanoseconds() / 1e9 if not schedule.paused else None,
    }


def _policy_text(data: bytes) -> str:
    """The stored policy of a call, in words ("" for none, or an unreadable one)."""
    if not data:
        return ""
    try:
        return describe_policy(policy_pb2.FunctionPolicy.FromString(data))
    except (DecodeError, ValueError):
        return "(unreadable)"


def _status_name(status: int) -> str:
    if not status:
        return ""
    try:
        return Status(status).name.lower()
    except ValueError:
        return f"status {status}"


def _error_json(error: error_pb2.Error, limit: int, *, traceback: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"type": error.type[:limit], "message": error.message[:limit]}
    if traceback:
        out["traceback"] = error.traceback.decode("utf-8", "replace")[-_LONG:]
        out["value"] = preview_pickle(error.value, limit) if error.value else ""
    return out


def _journal_json(journal: journal_pb2.Journal) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for index, call in enumerate(journal.calls):
        steps.append(
            {
                "kind": "call",
                "poll": call.poll,
                "epoch": call.epoch,
                "what": f"called {call.function}",
                "where": call.call_site,
                "id": index + 1,
            }
        )
    for number, epoch in enumerate(journal.epochs, 1):
        for event in epoch.events:
            kind = event.WhichOneof("kind")
            if kind == "result":
                result = event.result
                what = f"result of call {result.correlation_id}"
                if result.HasField("error"):
                    what += f": {result.error.type}: {result.error.message}"
                elif result.HasField("output"):
                    what += f": {preview_value(result.output, _SHORT)}"
            elif kind == "timer":
                what = f"timer {event.timer} fired"
            elif kind == "poll_error":
                error = event.poll_error.error
                what = f"poll {event.poll_error.poll} rejected: {error.type}: {error.message}"
            else:
                continue
            steps.append(
                {"kind": kind, "epoch": number, "time": epoch.time, "what": what[: _SHORT * 2]}
            )
    steps.sort(key=lambda step: (step["epoch"], step["kind"] != "call"))
    return {
        "function": journal.function,
        "polls": journal.polls,
        "start": journal.start_time,
        "app_version": journal.app_version,
        "steps": steps[:_MAX_STEPS],
        "hidden": max(len(steps) - _MAX_STEPS, 0),
    }
