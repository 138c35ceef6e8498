"""HTTP API of the scheduler: DispatchService, the test-only Wait RPC and InspectService.

All RPCs are Connect unary over HTTP POST, authenticated with ``Authorization: Bearer
<api key>`` (compared in constant time). Requests and responses are binary protobuf
(``application/proto``) or protobuf JSON (``application/json``); the response uses the
request's encoding. Failures are Connect errors: a JSON body ``{"code", "message"}``
with the matching HTTP status.

- ``/dispatch.sdk.v1.DispatchService/Dispatch``: submit calls atomically; the ids come
  back in request order once every call is committed. The ``Call`` message has no field
  for an idempotency key, so keys travel in ``DispatchRequest.idempotency_keys`` (field
  1000, an extension of this project that other schedulers skip as unknown): one per
  call in request order, ``""`` for a call without a key. A call whose key was submitted
  within the retention period is not created again; its id in the answer is the first
  submission's.
- ``/dispatch.sdk.v1.DispatchService/Wait``: the RPC of dispatch-py's test server; the
  body is a dispatch id as UTF-8 text, the answer the call's final ``CallResult``
  (binary) once it is done.
- ``/dispatch_aio.v1.InspectService/{ListCalls,GetCall,WaitCall,ListJournals}``: see
  inspect.proto.
- ``/dispatch_aio.v1.ControlService/{CancelCall,SendEvent}``: see control.proto.
- ``/dispatch_aio.v1.ScheduleService/*``: see schedule.proto.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from google.protobuf import (
    any_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    json_format,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import DecodeError, Message

from .._status import Status
from ..proto.sdk.python.v1 import pickled_pb2
from ..proto.sdk.v1 import call_pb2, dispatch_pb2
from ..proto.v1 import control_pb2, inspect_pb2, schedule_pb2
from ._engine import (
    Engine,
    EngineClosedError,
    EventAlreadyResolvedError,
    InvalidCallError,
    is_cancelled,
)
from ._journals import stored_journals
from ._schedules import ScheduleExistsError, ScheduleNotFoundError, Schedules
from ._timing import InvalidScheduleError
from .store import CallQuery, CallRecord, Phase, Store, StoreError

__all__ = [
    "CANCEL_PATH",
    "DISPATCH_PATH",
    "INSPECT_PREFIX",
    "MAX_CALLS_PER_REQUEST",
    "SCHEDULE_PREFIX",
    "SEND_EVENT_PATH",
    "STATE_OF_PHASE",
    "WAIT_PATH",
    "create_app",
]

logger = logging.getLogger("dispatch_aio.scheduler")

DISPATCH_PATH = "/dispatch.sdk.v1.DispatchService/Dispatch"
WAIT_PATH = "/dispatch.sdk.v1.DispatchService/Wait"
INSPECT_PREFIX = "/dispatch_aio.v1.InspectService/"
CANCEL_PATH = "/dispatch_aio.v1.ControlService/CancelCall"
SEND_EVENT_PATH = "/dispatch_aio.v1.ControlService/SendEvent"
SCHEDULE_PREFIX = "/dispatch_aio.v1.ScheduleService/"

_PROTO = "application/proto"
_JSON = "application/json"
_PROTO_TYPES = frozenset({_PROTO, "application/protobuf", "application/x-protobuf"})
_MAX_BODY = 64 * 1024 * 1024
_PAGE = 100
_MAX_PAGE = 1000
MAX_CALLS_PER_REQUEST = 10_000
"""Calls one DispatchRequest may submit; a larger batch is refused, not half taken."""
_MAX_SEQ = (1 << 63) - 1  # page tokens are SQLite row numbers
BODY_TIMEOUT = 30.0
"""Seconds a client may take to send a request body."""

# Message types that JSON responses can render inside a google.protobuf.Any: importing
# the modules registers them in the default descriptor pool.
_JSON_TYPES = (
    duration_pb2,
    empty_pb2,
    pickled_pb2,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

_M = TypeVar("_M", bound=Message)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATE_OF_PHASE = {
    Phase.PENDING: inspect_pb2.CALL_STATE_PENDING,
    Phase.SUSPENDED: inspect_pb2.CALL_STATE_SUSPENDED,
    Phase.DONE: inspect_pb2.CALL_STATE_DONE,
}
# Stored phases that may show as each state (RUNNING is known only in memory).
_PHASES_OF_STATE = {
    inspect_pb2.CALL_STATE_PENDING: (Phase.PENDING,),
    inspect_pb2.CALL_STATE_RUNNING: (Phase.PENDING, Phase.SUSPENDED),
    inspect_pb2.CALL_STATE_SUSPENDED: (Phase.SUSPENDED,),
    inspect_pb2.CALL_STATE_DONE: (Phase.DONE,),
}


class _ConnectError(Exception):
    def __init__(self, http_status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


def _error_response(http_status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=http_status)


@web.middleware
async def _connect_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer every failure as a Connect error."""
    try:
        return await handler(request)
    except _ConnectError as exc:
        return _error_response(exc.http_status, exc.code, exc.message)
    except StoreError as exc:
        logger.error("%s failed: %s", request.path, exc)
        return _error_response(503, "unavailable", f"the scheduler's database failed: {exc}")
    except EngineClosedError as exc:
        return _error_response(503, "unavailable", str(exc))
    except web.HTTPException as exc:
        if exc.status == 404:
            return _error_response(
                404,
                "unimplemented",
                f"no RPC at {request.path}; this scheduler serves {DISPATCH_PATH}, "
                f"{WAIT_PATH}, {CANCEL_PATH}, {SEND_EVENT_PATH}, {SCHEDULE_PREFIX}* and "
                f"{INSPECT_PREFIX}*",
            )
        if exc.status == 405:
            return _error_response(405, "unimplemented", "RPCs are called with POST")
        if exc.status == 413:
            return _error_response(
                413, "resource_exhausted", f"the request body exceeds {_MAX_BODY} bytes"
            )
        raise


class _Service:
    def __init__(
        self, engine: Engine, store: Store, api_key: str, schedules: Schedules | None = None
    ) -> None:
        self._engine = engine
        self._schedules = schedules
        self._store = store
        self._api_key = api_key.encode()

    def _check_auth(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise _ConnectError(
                401,
                "unauthenticated",
                "missing Authorization header: send 'Authorization: Bearer <api key>' with "
                "the scheduler's API key (DISPATCH_API_KEY)",
            )
        valid = hmac.compare_digest(token.strip().encode(), self._api_key)
        if scheme.lower() != "bearer" or not valid:
            raise _ConnectError(
                401,
                "unauthenticated",
                "invalid API key: send 'Authorization: Bearer <api key>' with the key the "
                "scheduler was started with (check DISPATCH_API_KEY)",
            )

    async def _read(self, request: web.Request, message: _M) -> tuple[_M, bool]:
        """Authenticate and decode the request body into `message`; True means JSON."""
        self._check_auth(request)
        content_type = request.content_type
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await request.read()
        except TimeoutError:
            raise _ConnectError(
                408,
                "deadline_exceeded",
                f"the request body was not received within {BODY_TIMEOUT:g} s",
            ) from None
        if content_type == _JSON:
            try:
                json_format.Parse(body.decode("utf-8"), message)
            except (json_format.ParseError, UnicodeDecodeError) as exc:
                raise _ConnectError(
                    400, "invalid_argument", f"cannot decode the JSON request: {exc}"
                ) from exc
            return message, True
        # aiohttp reports a missing Content-Type as application/octet-stream.
        if content_type not in _PROTO_TYPES and content_type != "application/octet-stream":
            raise _ConnectError(
                415,
                "invalid_argument",
                f"unsupported Content-Type {content_type!r}: use {_PROTO} or {_JSON}",
            )
        try:
            message.ParseFromString(body)
        except DecodeError as exc:
            raise _ConnectError(
                400, "invalid_argument", f"cannot decode the protobuf request: {exc}"
            ) from exc
        return message, False

    # DispatchService

    async def dispatch(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, dispatch_pb2.DispatchRequest())
        if len(req.calls) > MAX_CALLS_PER_REQUEST:
            raise _ConnectError(
                413,
                "resource_exhausted",
                f"the request submits {len(req.calls)} calls, over the limit of "
                f"{MAX_CALLS_PER_REQUEST} per request; submit them in several requests",
            )
        try:
            ids = await self._engine.submit(req.calls, req.idempotency_keys, urgent=True)
        except InvalidCallError as exc:
            raise _ConnectError(400, "invalid_argument", str(exc)) from exc
        return _reply(dispatch_pb2.DispatchResponse(dispatch_ids=ids), as_json)

    async def wait(self, request: web.Request) -> web.Response:
        self._check_auth(request)
        try:
            dispatch_id = (await request.read()).decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise _ConnectError(
                400, "invalid_argument", "the body must be a dispatch id in UTF-8 text"
            ) from exc
        rec = await self._engine.wait(dispatch_id)
        if rec is None:
            raise _not_found(dispatch_id)
        return web.Response(body=rec.result, content_type=_PROTO)

    # ControlService

    async def cancel_call(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, control_pb2.CancelCallRequest())
        try:
            stopped = await self._engine.cancel(req.dispatch_id)
        except LookupError:
            raise _not_found(req.dispatch_id) from None
        reply = control_pb2.CancelCallResponse(cancelled=stopped is not None, stopped=stopped or 0)
        return _reply(reply, as_json)

    async def send_event(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, control_pb2.SendEventRequest())
        result = call_pb2.CallResult()
        if req.HasField("error"):
            result.error.CopyFrom(req.error)
        elif req.HasField("value"):
            result.output.CopyFrom(req.value)
        try:
            woken = await self._engine.send_event(req.key, result)
        except EventAlreadyResolvedError as exc:
            raise _ConnectError(409, "already_exists", str(exc)) from None
        except InvalidCallError as exc:
            raise _ConnectError(400, "invalid_argument", str(exc)) from None
        return _reply(control_pb2.SendEventResponse(woken=woken), as_json)

    # ScheduleService

    def _require_schedules(self) -> Schedules:
        if self._schedules is None:
            raise _ConnectError(501, "unimplemented", "this scheduler runs no schedules")
        return self._schedules

    async def create_schedule(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, schedule_pb2.CreateScheduleRequest())
        schedules = self._require_schedules()
        try:
            created = await schedules.create(req.schedule)
        except InvalidScheduleError as exc:
            raise _ConnectError(400, "invalid_argument", str(exc)) from None
        except ScheduleExistsError as exc:
            raise _ConnectError(409, "already_exists", str(exc)) from None
        return _reply(created, as_json)

    async def list_schedules(self, request: web.Request) -> web.Response:
        _, as_json = await self._read(request, schedule_pb2.ListSchedulesRequest())
        found = self._require_schedules().list()
        return _reply(schedule_pb2.ListSchedulesResponse(schedules=found), as_json)

    async def pause_schedule(self, request: web.Request) -> web.Response:
        return await self._change_schedule(request, "pause")

    async def resume_schedule(self, request: web.Request) -> web.Response:
        return await self._change_schedule(request, "resume")

    async def delete_schedule(self, request: web.Request) -> web.Response:
        return await self._change_schedule(request, "delete")

    async def _change_schedule(self, request: web.Request, change: str) -> web.Response:
        req, as_json = await self._read(request, schedule_pb2.ScheduleRequest())
        schedules = self._require_schedules()
        try:
            if change == "delete":
                await schedules.delete(req.id)
                return _reply(schedule_pb2.DeleteScheduleResponse(), as_json)
            if change == "pause":
                return _reply(await schedules.pause(req.id), as_json)
            return _reply(await schedules.resume(req.id), as_json)
        except ScheduleNotFoundError as exc:
            raise _ConnectError(404, "not_found", str(exc)) from None

    # InspectService

    async def list_calls(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, inspect_pb2.ListCallsRequest())
        limit = min(req.limit or _PAGE, _MAX_PAGE)
        token = req.page_token
        if token and not (token.isascii() and token.isdigit() and int(token) <= _MAX_SEQ):
            raise _ConnectError(
                400, "invalid_argument", "invalid page_token: pass next_page_token back as is"
            )
        after = int(token) if token else 0
        states = set(req.states)
        phases = {p for s in states for p in _PHASES_OF_STATE.get(s, ())}
        if states and not phases:
            raise _ConnectError(400, "invalid_argument", "states has no valid CallState")
        statuses: set[int] = set(req.statuses)
        if req.cancelled:
            # Cancelled calls end with PERMANENT_ERROR: read those, keep the cancelled.
            statuses.add(Status.PERMANENT_ERROR)

        def wanted(rec: CallRecord) -> bool:
            if states and self._state(rec) not in states:
                return False
            if not req.cancelled or rec.status in req.statuses:
                return True
            return is_cancelled(rec)

        query = CallQuery(
            phases=tuple(sorted(phases)),
            statuses=tuple(sorted(statuses)),
            root_id=req.root_dispatch_id,
            parent_id="" if req.top_level_only else None,
            after=after,
            limit=limit + 1,
        )
        found: list[tuple[int, CallRecord]] = []
        while len(found) <= limit:
            rows = await self._store.list_calls(query)
            found.extend((seq, rec) for seq, rec in rows if wanted(rec))
            if len(rows) < (query.limit or 0):
                break
            query = dataclasses.replace(query, after=rows[-1][0])
        page = found[:limit]
        counts = await self._store.count_children([rec.id for _, rec in page])
        response = inspect_pb2.ListCallsResponse(
            calls=[
                self._info(rec, counts.get(rec.id, 0), payloads=not req.omit_payloads)
                for _, rec in page
            ]
        )
        if len(found) > limit:
            response.next_page_token = str(page[-1][0])
        return _reply(response, as_json)

    async def get_call(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, inspect_pb2.GetCallRequest())
        rec = await self._store.get_call(req.dispatch_id)
        if rec is None:
            raise _not_found(req.dispatch_id)
        children: dict[str, list[CallRecord]] = {}
        for _, member in await self._store.list_calls(CallQuery(root_id=rec.root_id)):
            if member.parent_id:
                children.setdefault(member.parent_id, []).append(member)
        top = inspect_pb2.CallTree()
        for attempt in await self._store.list_attempts(rec.id):
            entry = top.call.attempt_log.add(
                number=attempt.number,
                status=attempt.status,
                outcome=attempt.outcome,
            )
            entry.start_time.FromNanoseconds(round(attempt.started_at * 1e9))
            entry.finish_time.FromNanoseconds(round(attempt.finished_at * 1e9))
        stack = [(top, rec, 1)]
        while stack:
            node, call, depth = stack.pop()
            kids = children.get(call.id, [])
            node.call.MergeFrom(self._info(call, len(kids)))
            if req.max_depth and depth > req.max_depth:
                continue
            for kid in kids:
                stack.append((node.children.add(), kid, depth + 1))
        return _reply(inspect_pb2.GetCallResponse(tree=top), as_json)

    async def wait_call(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, inspect_pb2.WaitCallRequest())
        timeout = req.timeout.ToNanoseconds() / 1e9 if req.HasField("timeout") else None
        rec = await self._engine.wait(req.dispatch_id, timeout)
        if rec is None:
            raise _not_found(req.dispatch_id)
        counts = await self._store.count_children([rec.id])
        info = self._info(rec, counts.get(rec.id, 0))
        return _reply(inspect_pb2.WaitCallResponse(call=info), as_json)

    async def list_journals(self, request: web.Request) -> web.Response:
        req, as_json = await self._read(request, inspect_pb2.ListJournalsRequest())
        token = req.page_token
        if token and not (token.isascii() and token.isdigit() and int(token) <= _MAX_SEQ):
            raise _ConnectError(
                400, "invalid_argument", "invalid page_token: pass next_page_token back as is"
            )
        journals, after = await stored_journals(self._store, int(token) if token else 0)
        response = inspect_pb2.ListJournalsResponse(journals=journals)
        if after:
            response.next_page_token = str(after)
        return _reply(response, as_json)

    def _state(self, rec: CallRecord) -> inspect_pb2.CallState.ValueType:
        if rec.phase is not Phase.DONE:
            view = self._engine.live_view(rec.id)
            if view is not None and view[0]:
                return inspect_pb2.CALL_STATE_RUNNING
        return STATE_OF_PHASE[rec.phase]

    def _info(
        self, rec: CallRecord, child_count: int, *, payloads: bool = True
    ) -> inspect_pb2.CallInfo:
        view = self._engine.live_view(rec.id) if rec.phase is not Phase.DONE else None
        info = inspect_pb2.CallInfo(
            dispatch_id=rec.id,
            parent_dispatch_id=rec.parent_id,
            root_dispatch_id=rec.root_id,
            endpoint=rec.endpoint,
            function=rec.function,
            state=self._state(rec),
            status=rec.status,  # type: ignore[arg-type]
            attempts=rec.attempts,
            polls=rec.polls,
            last_error=rec.last_error,
            queued_results=view[1] if view is not None else 0,
            correlation_id=rec.correlation_id,
            child_count=child_count,
            divergences=rec.divergences,
            version=rec.version,
            cancelled=is_cancelled(rec),
        )
        if rec.policy:
            with contextlib.suppress(DecodeError):  # unreadable: left out, the rest is shown
                info.policy.MergeFromString(rec.policy)
        info.creation_time.FromNanoseconds(round(rec.created_at * 1e9))
        info.expiration_time.FromNanoseconds(round(rec.expires_at * 1e9))
        info.update_time.FromNanoseconds(round(rec.updated_at * 1e9))
        if rec.finished_at is not None:
            info.finish_time.FromNanoseconds(round(rec.finished_at * 1e9))
        if rec.due_at is not None and info.state in _WAITING:
            info.due_time.FromNanoseconds(round(rec.due_at * 1e9))
        if payloads:
            if rec.input:
                info.input.MergeFromString(rec.input)
            if rec.phase is Phase.DONE:
                info.result.MergeFromString(rec.result)
        return info


_WAITING = frozenset({inspect_pb2.CALL_STATE_PENDING, inspect_pb2.CALL_STATE_SUSPENDED})


def _not_found(dispatch_id: str) -> _ConnectError:
    return _ConnectError(404, "not_found", f"no call with dispatch id {dispatch_id!r}")


def _reply(message: Message, as_json: bool) -> web.Response:
    if not as_json:
        return web.Response(body=message.SerializeToString(), content_type=_PROTO)
    _make_any_renderable(message)
    text = json_format.MessageToJson(message, indent=None)
    return web.Response(body=text.encode(), content_type=_JSON)


def _make_any_renderable(message: Message) -> None:
    """Replace each Any whose type is unknown here by an OpaqueValue (JSON needs the type)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            if isinstance(item, any_pb2.Any):
                if not _renders(item):
                    opaque = inspect_pb2.OpaqueValue(type_url=item.type_url, value=item.value)
                    item.Pack(opaque)
            elif isinstance(item, Message):
                _make_any_renderable(item)


def _renders(value: any_pb2.Any) -> bool:
    name = value.TypeName()
    try:
        descriptor_pool.Default().FindMessageTypeByName(name)
        json_format.MessageToDict(value)
    except (KeyError, TypeError, ValueError, json_format.Error, DecodeError):
        return False
    return True


def create_app(
    engine: Engine, store: Store, *, api_key: str, schedules: Schedules | None = None
) -> web.Application:
    """Build the scheduler's aiohttp application.

    Args:
        engine: The running engine calls are submitted to.
        store: The store inspected.
        api_key: The key clients must send as ``Authorization: Bearer <api key>``.
        schedules: The schedules the ScheduleService manages (None: it is not served).

    Returns:
        The application; it owns no resources (the caller starts and stops them).
    """
    service = _Service(engine, store, api_key, schedules)
    app = web.Application(client_max_size=_MAX_BODY, middlewares=[_connect_errors])
    app.add_routes(
        [
            web.post(DISPATCH_PATH, service.dispatch),
            web.post(WAIT_PATH, service.wait),
            web.post(INSPECT_PREFIX + "ListCalls", service.list_calls),
            web.post(INSPECT_PREFIX + "GetCall", service.get_call),
            web.post(INSPECT_PREFIX + "WaitCall", service.wait_call),
            web.post(INSPECT_PREFIX + "ListJournals", service.list_journals),
            web.post(CANCEL_PATH, service.cancel_call),
            web.post(SEND_EVENT_PATH, service.send_event),
            web.post(SCHEDULE_PREFIX + "CreateSchedule", service.create_schedule),
            web.post(SCHEDULE_PREFIX + "ListSchedules", service.list_schedules),
            web.post(SCHEDULE_PREFIX + "PauseSchedule", service.pause_schedule),
            web.post(SCHEDULE_PREFIX + "ResumeSchedule", service.resume_schedule),
            web.post(SCHEDULE_PREFIX + "DeleteSchedule", service.delete_schedule),
        ]
    )
    return app
