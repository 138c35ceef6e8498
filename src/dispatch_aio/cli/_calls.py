"""``calls``, ``show`` and ``call``: finding calls, listing them, and submitting one.

The inspection commands talk to a running scheduler's API; when none runs, they read
the database of the data folder through the same service, served in this process on
loopback for as long as the command runs (`offline_api`), so that a finished
``dispatch-aio run`` can still be inspected. A call may be named by a unique prefix of
its dispatch id (`resolve_id`).
"""

from __future__ import annotations

__all__ = [
    "CallFilter",
    "calls_document",
    "offline_api",
    "parse_arguments",
    "render_filtered",
    "resolve_id",
    "tree_document",
]

import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from .._status import Status
from ..proto.v1 import inspect_pb2
from ..scheduler._api import create_app
from ..scheduler._engine import Engine
from ..scheduler.store import CallRecord, PostgresStore, SQLiteStore, Store, StoreError
from ..scheduler.store._postgres import mask_url
from ._console import Console, Style
from ._format import describe_input, describe_result
from ._inspect import STATES, STATUSES, InspectClient, render_calls, state_name
from ._scheduler import CliError

_OK = int(Status.OK)
_FAILED = "failed"
_ID_LENGTH = 32
_HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True, slots=True)
class CallFilter:
    """What ``calls`` was asked to select."""

    states: tuple[str, ...] = ()
    """Names from `STATES`, or "failed" (done with a status other than ok)."""
    statuses: tuple[str, ...] = ()
    """Names from `STATUSES`, "failed", or "cancelled" (the calls cancelled)."""

    @property
    def active(self) -> bool:
        """Whether any condition was given."""
        return bool(self.states or self.statuses)

    def request(self) -> inspect_pb2.ListCallsRequest:
        """Return the ListCalls request that selects these calls (payloads left out)."""
        states = {STATES[s] for s in self.states if s != _FAILED}
        statuses: set[int] = set()
        cancelled = False
        for name in self.statuses:
            if name == _FAILED:
                statuses.update(v for n, v in STATUSES.items() if n != "ok")
            elif name == "cancelled":
                cancelled = True
            else:
                statuses.add(STATUSES[name])
        if _FAILED in self.states:  # --state failed: done, and not ok
            if states:
                raise CliError(
                    "--state failed cannot go with other states: a failed call is done", 2
                )
            if not statuses:
                statuses.update(v for n, v in STATUSES.items() if n != "ok")
            else:
                statuses.discard(STATUSES["ok"])
        return inspect_pb2.ListCallsRequest(
            states=sorted(states),
            statuses=sorted(statuses),  # type: ignore[arg-type]
            cancelled=cancelled,
            omit_payloads=True,
            limit=1000,
        )


def render_filtered(
    found: Sequence[inspect_pb2.CallInfo],
    roots: dict[str, inspect_pb2.CallInfo],
    console: Console,
) -> list[str]:
    """A table of the calls found, each under the top-level call of its tree.

    A call made by a function shows below its tree's top-level call (listed for context
    even when it does not match), marked with ``└─``.
    """
    ordered: list[inspect_pb2.CallInfo] = []
    marks: list[bool] = []
    shown: set[str] = set()
    for info in found:
        if info.parent_dispatch_id:
            root = roots.get(info.root_dispatch_id)
            if root is not None and root.dispatch_id not in shown:
                ordered.append(root)
                marks.append(False)
                shown.add(root.dispatch_id)
            ordered.append(info)
            marks.append(True)
        elif info.dispatch_id not in shown:
            ordered.append(info)
            marks.append(False)
            shown.add(info.dispatch_id)
    lines = render_calls(ordered, console, children=marks)
    return lines


def call_document(info: inspect_pb2.CallInfo) -> dict[str, Any]:
    """A call as JSON fields, named and counted as the table shows them."""
    done = info.state == inspect_pb2.CALL_STATE_DONE
    doc: dict[str, Any] = {
        "dispatch_id": info.dispatch_id,
        "parent_dispatch_id": info.parent_dispatch_id or None,
        "root_dispatch_id": info.root_dispatch_id,
        "function": info.function,
        "endpoint": info.endpoint,
        "state": state_name(info),
        "status": _status(info.status) if done else None,
        "attempts": attempt_count(info),
        "requests": info.attempts,
        "polls": info.polls,
        "children": info.child_count,
        "divergences": info.divergences,
        "version": info.version or None,
        "cancelled": info.cancelled,
        "created": _time(info.creation_time),
        "expires": _time(info.expiration_time) if info.HasField("expiration_time") else None,
        "finished": _time(info.finish_time) if info.HasField("finish_time") else None,
        "due": _time(info.due_time) if info.HasField("due_time") else None,
        "last_error": info.last_error or None,
    }
    if info.HasField("input"):
        doc["input"] = describe_input(info.input, 0)
    if done and info.HasField("result"):
        key = "error" if info.result.HasField("error") or info.status != _OK else "output"
        doc[key] = describe_result(info.result, info.status, 0)
    if info.attempt_log:
        doc["request_log"] = [
            {
                "number": a.number,
                "started": _time(a.start_time),
                "finished": _time(a.finish_time),
                "status": _status(a.status),
                "outcome": a.outcome,
            }
            for a in info.attempt_log
        ]
    return doc


def calls_document(calls: Iterable[inspect_pb2.CallInfo], total: int) -> str:
    """``calls --json``: one JSON document listing the calls."""
    listed = [call_document(info) for info in calls]
    return json.dumps({"calls": listed, "total": total}, indent=2)


def tree_document(tree: inspect_pb2.CallTree) -> str:
    """``show --json``: one JSON document, the call with its calls nested."""

    def node(tree: inspect_pb2.CallTree) -> dict[str, Any]:
        doc = call_document(tree.call)
        doc["calls"] = [node(child) for child in tree.children]
        return doc

    return json.dumps(node(tree), indent=2)


def attempt_count(info: inspect_pb2.CallInfo) -> int:
    """Attempts as the table counts them: runs from the input and retries, not resumes."""
    return max(info.attempts - info.polls, 1 if info.attempts else 0)


def _status(status: int) -> str:
    try:
        return Status(status).name.lower()
    except ValueError:
        return f"status {status}"


def _time(stamp: Any) -> str:
    return str(stamp.ToJsonString())


async def resolve_id(client: InspectClient, given: str) -> str:
    """Return the dispatch id that `given` names: itself, or the one id it begins or ends.

    Raises:
        CliError: No call, or several, begin with it.
    """
    given = given.strip()
    if len(given) >= _ID_LENGTH or not given or not _HEX.fullmatch(given):
        return given  # a whole id, or not a prefix of one: asked for as it is
    request = inspect_pb2.ListCallsRequest(omit_payloads=True, limit=1000)
    matches = [c.dispatch_id for c in await client.iter_calls(request)]
    # Ids begin with their creation time: calls made together share their first
    # characters, so the last ones name a call as well.
    given = given.lower()
    matches = [m for m in matches if m.startswith(given) or m.endswith(given)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(
            f"no call with a dispatch id beginning or ending with {given!r}; `dispatch-aio "
            "calls --all` lists them"
        )
    listed = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise CliError(
        f"{len(matches)} calls have a dispatch id beginning or ending with {given!r} "
        f"({listed}): give more of it"
    )


def parse_arguments(values: Sequence[str]) -> tuple[Any, ...]:
    """``call`` arguments: each a JSON value (``10``, ``'"text"'``, ``'{"a": 1}'``).

    A word that is not JSON is taken as a string, so ``call greet World`` works.
    """
    parsed = []
    for value in values:
        try:
            parsed.append(json.loads(value))
        except ValueError:
            parsed.append(value)
    return tuple(parsed)


class _StoredCalls:
    """What the API service needs of the engine, for a database no scheduler runs on.

    Nothing runs: every call is as the database has it, and nothing can be submitted
    or cancelled.
    """

    def __init__(self, store: Store, database: str) -> None:
        self._store = store
        self._database = database

    def live_view(self, dispatch_id: str) -> None:
        return None

    async def wait(self, dispatch_id: str, max_seconds: float | None = None) -> CallRecord | None:
        return await self._store.get_call(dispatch_id)

    async def submit(self, *args: object) -> list[str]:
        raise LookupError(self._stopped("submit calls"))

    async def cancel(self, dispatch_id: str) -> int | None:
        raise LookupError(self._stopped("cancel calls"))

    def _stopped(self, what: str) -> str:
        return f"no scheduler runs on {self._database}: start one to {what}"


@contextlib.asynccontextmanager
async def offline_api(
    data_dir: str, console: Console, database: str = ""
) -> AsyncIterator[tuple[str, str]]:
    """Serve the inspection API of a database no scheduler API was given for.

    Args:
        data_dir: The folder of the SQLite database.
        console: Where to say where the calls are read from.
        database: A PostgreSQL URL to read instead ("": the SQLite database).

    Yields:
        The API URL (loopback, a free port) and its key.

    Raises:
        CliError: There is no database there, or a scheduler holds it.
    """
    store: Store
    if database:
        where = mask_url(database)
        store = PostgresStore(database)
    else:
        path = Path(data_dir) / "scheduler.db"
        where = str(path)
        if not path.is_file():
            raise CliError(
                f"no scheduler to inspect: none runs on {data_dir}, which holds no database; "
                "pass --api-url and --api-key, set DISPATCH_API_URL and DISPATCH_API_KEY (as "
                "`dispatch-aio server` prints them), or pass --data-dir or --database",
                code=2,
            )
        store = SQLiteStore(str(path))
    try:
        await store.open()
    except StoreError as exc:
        raise CliError(
            f"cannot read {where}: {exc}; if a scheduler runs there, pass --api-url and --api-key"
        ) from None
    key = secrets.token_urlsafe(16)
    runner = None
    try:
        engine = cast(Engine, _StoredCalls(store, where))
        # Its only client is this command: once it stops (Ctrl-C), a read still in
        # flight is not waited for.
        runner = web.AppRunner(
            create_app(engine, store, api_key=key), access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        note = (
            f"(read from {where}, not through a scheduler)"
            if database
            else f"(no scheduler runs: read from {where})"
        )
        console.line(console.paint(note, Style.DIM, err=True), err=True)
        yield f"http://127.0.0.1:{port}", key
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
