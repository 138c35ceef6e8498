"""The ``dispatch-aio`` command (also ``python -m dispatch_aio``).

Subcommands:

- ``run [OPTIONS] -- CMD [ARGS...]``: start the local scheduler and the application CMD
  with ``DISPATCH_API_URL``, ``DISPATCH_API_KEY``, ``DISPATCH_ENDPOINT_URL``,
  ``DISPATCH_ENDPOINT_ADDR`` and ``DISPATCH_VERIFICATION_KEY`` set; show its output
  (prefixed) and the progress of calls; exit with its status.
- ``server [OPTIONS]``: run the scheduler alone; print the variables to export, then
  ``Ready. Press Ctrl+C to stop.`` (a stable line scripts can wait for).
- ``calls [OPTIONS]``: list the calls of a running scheduler.
- ``show ID``: show one call and the calls it made.
- ``check APP [FILE...]``: replay the journals of suspended calls (from the database,
  or from files) against the code of APP, and report those that would diverge.
- ``version``: print the version.

Calls are kept in ``.dispatch/scheduler.db`` (``--data-dir`` to choose the folder,
``--in-memory`` to keep nothing), or in PostgreSQL with ``--database
postgresql://USER@HOST/DB`` (or ``DISPATCH_DATABASE_URL``). The scheduler's API
listens on 127.0.0.1, on a free port for ``run`` and on port 4450 for ``server``;
``calls`` and ``show`` find a scheduler through ``--api-url``/``--api-key``,
``DISPATCH_API_URL``/``DISPATCH_API_KEY``, or the connection file a running scheduler
writes in its data folder.

Exit statuses: that of CMD for ``run`` (127 if it is not found, 126 if it cannot be
executed); 0 on success, 1 on a failure, 2 on a usage error otherwise.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import pathlib
import platform
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from google.protobuf import json_format

from .. import __version__
from .._client import Call
from .._function import check_function_name
from .._logs import LOG_FORMAT, LOG_FORMATS, log_format_from_env
from .._serving import tune_garbage_collector
from .._status import Status
from ..proto.v1 import inspect_pb2
from ..scheduler._ui import ui_address
from ._calls import (
    CallFilter,
    calls_document,
    offline_api,
    parse_arguments,
    render_filtered,
    resolve_id,
    tree_document,
)
from ._console import Console, ConsoleLogHandler, Style
from ._control import add_control_commands, schedule_command, send_event_command
from ._format import describe_result, plural
from ._inspect import (
    STATES,
    STATUSES,
    CallNotFoundError,
    InspectClient,
    InspectError,
    render_calls,
    render_tree,
)
from ._progress import CallTracker, Progress
from ._run import RunOptions, run_app
from ._scheduler import (
    DB_FILE,
    DEFAULT_DATA_DIR,
    CliError,
    LocalScheduler,
    SchedulerSettings,
    check_data_dir,
    endpoint_url_for,
    exposure_warning,
    format_addr,
    parse_addr,
    read_connection,
)

PROG = "dispatch-aio"
_DEFAULTS = SchedulerSettings()
DEFAULT_SERVER_PORT = 4450
DEFAULT_ENDPOINT = "127.0.0.1:8000"
READY_LINE = "Ready. Press Ctrl+C to stop."
"""The last line ``dispatch-aio server`` prints once it accepts calls."""

_LOG_LEVELS = ("debug", "info", "warning", "error")
DATABASE_ENV = "DISPATCH_DATABASE_URL"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run Dispatch durable functions locally: a scheduler on this machine, "
        "with your application.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="warning",
        help="scheduler logs shown on standard error (default: warning)",
    )
    logs.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help=f"log lines as text, or one JSON object per line (default: {LOG_FORMAT} if "
        "set, else text); under run, the app's default log output follows it",
    )

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        type=_data_dir,
        metavar="PATH",
        help=f"folder of the scheduler's database (default: {DEFAULT_DATA_DIR})",
    )

    sched = argparse.ArgumentParser(add_help=False, parents=[logs, data])
    sched.add_argument(
        "--in-memory", action="store_true", help="keep calls in memory only (lost at exit)"
    )
    sched.add_argument(
        "--database",
        metavar="URL",
        help="keep calls in PostgreSQL, at postgresql://USER@HOST/DB (default: "
        f"{DATABASE_ENV} if set, else SQLite in --data-dir); needs "
        "pip install 'dispatch-aio[postgres]'",
    )
    sched.add_argument(
        "--host", default="127.0.0.1", help="address the scheduler API binds (default: 127.0.0.1)"
    )
    sched.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key clients must send (default: one made once and kept in the database; "
        "random for each run with --in-memory)",
    )
    sched.add_argument(
        "--run-timeout",
        type=float,
        default=_DEFAULTS.run_timeout,
        metavar="SECONDS",
        help="seconds one Run request to the application may take (default: 300)",
    )
    sched.add_argument(
        "--idempotency-retention",
        type=float,
        default=_DEFAULTS.idempotency_retention,
        metavar="SECONDS",
        help="seconds a submission's idempotency key is remembered: a submission with the "
        "same key within that time returns the first one's dispatch id (default: 86400)",
    )
    sched.add_argument(
        "--lease-timeout",
        type=float,
        default=_DEFAULTS.lease_timeout,
        metavar="SECONDS",
        help="with --database, where several schedulers may run: seconds after which the "
        "calls of a scheduler that stopped renewing its leases (every third of this) go "
        "to the others (default: 9)",
    )
    sched.add_argument(
        "--max-attempts",
        type=int,
        default=_DEFAULTS.max_attempts,
        metavar="N",
        help="answers in a row with a temporary error (TimeoutError, ConnectionError ...) "
        "after which a call fails with that error; 0 retries until the call expires "
        f"(default: {_DEFAULTS.max_attempts})",
    )
    sched.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        metavar="HOST:PORT",
        help=f"address the application serves its functions on (default: {DEFAULT_ENDPOINT})",
    )

    run = commands.add_parser(
        "run",
        parents=[sched],
        help="run the scheduler and your application together",
        description="Start the scheduler, then CMD with the DISPATCH_* variables pointing at "
        "it; show CMD's output and the calls' progress; exit with CMD's status.",
        usage=f"{PROG} run [OPTIONS] -- CMD [ARGS...]",
    )
    run.add_argument(
        "--port", type=int, default=0, help="port of the scheduler API (default: a free one)"
    )
    run.add_argument("--name", help="prefix of CMD's output lines (default: from CMD)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="the application")

    server = commands.add_parser(
        "server",
        parents=[sched],
        help="run the scheduler alone",
        description="Run the scheduler; print the variables your application needs, then "
        f"{READY_LINE!r}.",
    )
    server.add_argument(
        "--port",
        type=int,
        default=DEFAULT_SERVER_PORT,
        help=f"port of the scheduler API (default: {DEFAULT_SERVER_PORT}; 0: a free one)",
    )
    server.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="ENDPOINT=URL,URL...",
        help="an endpoint served by several app processes: the URL calls name, and the URLs "
        "of its replicas; a call's resumes go to the replica that ran it (repeatable)",
    )
    server.add_argument(
        "--version-endpoint",
        action="append",
        default=[],
        metavar="VERSION=URL",
        help="run the calls of an application version (Call.version) at this endpoint, e.g. "
        "the old release kept running until its calls finish (repeatable)",
    )

    api = argparse.ArgumentParser(add_help=False, parents=[data])
    api.add_argument("--api-url", metavar="URL", help="the scheduler API (DISPATCH_API_URL)")
    api.add_argument("--api-key", metavar="KEY", help="its API key (DISPATCH_API_KEY)")
    api.add_argument("--json", action="store_true", help="print JSON")
    # calls and show read a database directly too.
    stored = argparse.ArgumentParser(add_help=False, parents=[api])
    stored.add_argument(
        "--database",
        metavar="URL",
        help="read the calls from this PostgreSQL database, postgresql://USER@HOST/DB, "
        f"rather than through a scheduler (default: {DATABASE_ENV} when no scheduler "
        "is found)",
    )

    calls = commands.add_parser(
        "calls",
        parents=[stored],
        help="list the calls of a running scheduler",
        description="List calls, oldest first (top-level calls unless --all or --root).",
    )
    calls.add_argument(
        "--state",
        action="append",
        choices=[*sorted(STATES), "failed"],
        help="only calls in this state ('failed': done, with a status other than ok); "
        "calls made by functions show under their top-level call",
    )
    calls.add_argument(
        "--status",
        action="append",
        choices=[*sorted(STATUSES), "cancelled", "failed"],
        help="only finished calls with this status ('failed': any but ok; 'cancelled': "
        "the calls cancelled, which end with permanent_error)",
    )
    calls.add_argument("--root", metavar="ID", help="only the calls of this call's tree")
    calls.add_argument("--all", action="store_true", help="include calls made by functions")
    calls.add_argument(
        "--limit", type=int, default=50, help="show the last N calls (default: 50; 0: all)"
    )
    calls.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="list again every SECONDS (default 2) until Ctrl-C",
    )

    show = commands.add_parser(
        "show",
        parents=[stored],
        help="show a call and the calls it made",
        description="Show a call tree: states, attempts, timings, inputs, outputs and errors.",
    )
    show.add_argument(
        "dispatch_id", metavar="ID", help="the call's dispatch id, or its first or last characters"
    )
    show.add_argument("--depth", type=int, default=0, help="levels of calls below (0: all)")
    show.add_argument("--all", action="store_true", help="show every child (default: 20 each)")

    cancel = commands.add_parser(
        "cancel",
        parents=[api],
        help="cancel a call and the calls below it",
        description="Cancel a call and every unfinished call below it: they make no further "
        "attempts and end as cancelled. A call that has finished already is left as it is.",
    )
    cancel.add_argument(
        "dispatch_id", metavar="ID", help="the call's dispatch id, or its first or last characters"
    )

    submit = commands.add_parser(
        "call",
        parents=[api],
        help="submit a call and print its dispatch id",
        description="Submit a call to FUNCTION of the application the scheduler runs, with "
        "ARGS, each a JSON value (10, '\"text\"', '[1, 2]'; a word that is not JSON is a "
        "string); print its dispatch id, or with --wait its result.",
    )
    submit.add_argument("function", metavar="FUNCTION", help="the function's registered name")
    submit.add_argument("arguments", nargs="*", metavar="ARGS", help="its arguments, as JSON")
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: seconds to wait at most"
    )
    submit.add_argument(
        "--endpoint",
        metavar="URL",
        help="the application's endpoint (default: DISPATCH_ENDPOINT_URL, else the "
        "scheduler's own)",
    )
    add_control_commands(commands, api)

    check = commands.add_parser(
        "check",
        parents=[data],
        help="replay recorded journals against the current code",
        description="Replay the journals of suspended calls (from the scheduler's database, "
        "which must not be in use, or from files) against the functions of APP, and report "
        "those that would diverge. Exits 1 if any would.",
    )
    check.add_argument(
        "app", metavar="APP", help="the application, as module:attribute or file.py:attribute"
    )
    check.add_argument(
        "files", nargs="*", metavar="FILE", help="journal files (default: the database)"
    )

    commands.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command.

    Args:
        argv: The arguments (without the program name); default ``sys.argv[1:]``.

    Returns:
        The exit status.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    console = Console(sys.stdout, sys.stderr)
    try:
        match args.subcommand:
            case "run":
                return _with_logging(args, console, _run_command(args, console))
            case "server":
                return _with_logging(args, console, _server_command(args, console))
            case "calls":
                return asyncio.run(_calls_command(args, console))
            case "show":
                return asyncio.run(_show_command(args, console))
            case "cancel":
                return asyncio.run(_cancel_command(args, console))
            case "send-event":
                return asyncio.run(send_event_command(args, console, *_api(args)))
            case "schedule":
                return asyncio.run(schedule_command(args, console, *_api(args)))
            case "call":
                return asyncio.run(_call_command(args, console))
            case "check":
                return asyncio.run(_check_command(args, console))
            case "version":
                print(f"{PROG} {__version__} (Python {platform.python_version()})")
                return 0
            case _:
                parser.print_help(sys.stderr)
                return 2
    except CliError as exc:
        prog = f"{PROG} {args.subcommand}" if args.subcommand else PROG
        console.line(console.paint(f"{prog}: error: {exc.message}", Style.RED, err=True), err=True)
        return exc.code
    except KeyboardInterrupt:
        return 130


async def _check_command(args: argparse.Namespace, console: Console) -> int:
    from . import _check

    mains = {name: sys.modules.get(name) for name in ("__main__", "__mp_main__")}
    try:
        target = _check.load_target(args.app)
        journals = None
        if not args.files and (running := read_connection(args.data_dir)) is not None:
            # A scheduler runs there and holds its database: ask it for the journals.
            journals = await _running_journals(*running)
        if journals is None:
            database = None if args.files else pathlib.Path(args.data_dir) / DB_FILE
            journals = _check.read_journals(args.files, database)
        if not journals:
            console.line("no journals to check")
            return 0
        reports = await _check.run_check(target, journals)
    finally:  # the command may run inside another program (tests call main())
        for name, module in mains.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    for line in _check.describe(reports):
        console.line(line)
    bad = sum(not r.ok for r in reports)
    console.line(f"{len(reports) - bad} of {len(reports)} journals replay; {bad} diverge")
    return 1 if bad else 0


async def _running_journals(url: str, key: str) -> list[tuple[str, bytes]] | None:
    """The journals a running scheduler keeps, or None if it does not answer."""
    try:
        async with InspectClient(url, key) as client:
            stored = await client.list_journals()
    except InspectError:
        return None  # gone (it left its connection file behind): read the database
    return [(j.dispatch_id, j.journal) for j in stored]


def _with_logging(
    args: argparse.Namespace, console: Console, coro: Coroutine[Any, Any, int]
) -> int:
    """Run `coro` with the logs going to `console` at the chosen level."""
    root = logging.getLogger()
    ours = console.paint("dispatch | ", Style.MAGENTA, err=True) if args.subcommand == "run" else ""
    json_lines = _log_format(args) == "json"
    handler = ConsoleLogHandler(console, "" if json_lines else ours, json=json_lines)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(args.log_level.upper())
    try:
        return asyncio.run(coro)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _log_format(args: argparse.Namespace) -> str:
    if args.log_format is not None:
        return str(args.log_format)
    try:
        return log_format_from_env(os.environ) or "text"
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None


def _settings(args: argparse.Namespace) -> SchedulerSettings:
    if not 0 <= args.port <= 65535:
        raise CliError(f"invalid --port {args.port}: use 0 to 65535", code=2)
    if args.api_key is not None and not args.api_key.strip():
        raise CliError("--api-key is empty: give a key, or leave the option out", code=2)
    if not args.run_timeout > 0:
        raise CliError(f"invalid --run-timeout {args.run_timeout:g}: it must be positive", 2)
    if not args.idempotency_retention > 0:
        raise CliError(
            f"invalid --idempotency-retention {args.idempotency_retention:g}: it must be "
            "positive (seconds)",
            code=2,
        )
    if not args.lease_timeout >= 0.3:
        raise CliError(
            f"invalid --lease-timeout {args.lease_timeout:g}: give at least 0.3 (seconds)",
            code=2,
        )
    if args.max_attempts < 0:
        raise CliError(f"invalid --max-attempts {args.max_attempts}: use 0 or more", code=2)
    if args.database is not None and args.in_memory:
        raise CliError(
            "--database and --in-memory cannot go together: the calls are kept in one place",
            code=2,
        )
    database = args.database
    if database is None and not args.in_memory:
        database = os.environ.get(DATABASE_ENV, "").strip()
    if args.database is not None and not database.strip():
        raise CliError("--database is empty: give postgresql://USER@HOST/DB", code=2)
    return SchedulerSettings(
        replicas=_replicas(getattr(args, "replica", [])),
        version_endpoints=_version_endpoints(getattr(args, "version_endpoint", [])),
        host=args.host,
        port=args.port,
        api_key=args.api_key.strip() if args.api_key else None,
        data_dir=args.data_dir,
        in_memory=args.in_memory,
        database=(database or "").strip(),
        run_timeout=args.run_timeout,
        idempotency_retention=args.idempotency_retention,
        lease_timeout=args.lease_timeout,
        max_attempts=args.max_attempts,
    )


def _replicas(options: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    replicas = []
    for option in options:
        endpoint, _, urls = option.partition("=")
        listed = tuple(u.strip().rstrip("/") for u in urls.split(",") if u.strip())
        if not endpoint.strip() or not listed:
            raise CliError(
                f"invalid --replica {option!r}: give ENDPOINT=URL,URL..., e.g. "
                "http://app:8000=http://10.0.0.1:8000,http://10.0.0.2:8000",
                code=2,
            )
        replicas.append((endpoint.strip().rstrip("/"), listed))
    return tuple(replicas)


def _version_endpoints(options: list[str]) -> tuple[tuple[str, str], ...]:
    found = []
    for option in options:
        version, _, url = option.partition("=")
        if not version.strip() or not url.strip():
            raise CliError(
                f"invalid --version-endpoint {option!r}: give VERSION=URL, e.g. "
                "1.4=http://127.0.0.1:8001",
                code=2,
            )
        found.append((version.strip(), url.strip().rstrip("/")))
    return tuple(found)


def _data_dir(value: str) -> str:
    try:
        return check_data_dir(value)
    except CliError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


async def _run_command(args: argparse.Namespace, console: Console) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CliError(
            f"no command to run: {PROG} run [OPTIONS] -- CMD [ARGS...], for example "
            f"{PROG} run -- python app.py",
            code=2,
        )
    options = RunOptions(
        command=command,
        scheduler=_settings(args),
        endpoint=args.endpoint,
        name=args.name,
        log_format=_log_format(args),
    )
    return await run_app(options, console)


async def _server_command(args: argparse.Namespace, console: Console) -> int:
    host, port = parse_addr(args.endpoint, "--endpoint")
    endpoint_url = endpoint_url_for(host, port)
    settings = dataclasses.replace(_settings(args), endpoint_url=endpoint_url)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            console.line(f"{sig.name} received again: exiting now", err=True)
            os._exit(128 + sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        tracker = CallTracker()
        async with LocalScheduler(settings, tracker) as local:
            tune_garbage_collector()  # the process is ours: see `_serving`
            Progress(console, tracker)  # a line per finished top-level call
            exports = {
                "DISPATCH_API_URL": local.api_url,
                "DISPATCH_API_KEY": local.api_key,
                "DISPATCH_ENDPOINT_URL": endpoint_url,
                "DISPATCH_ENDPOINT_ADDR": format_addr(host, port),
                "DISPATCH_VERIFICATION_KEY": local.verification_key,
            }
            lines = [
                f"{PROG} {__version__} (local scheduler)",
                "",
                f"API:       {local.api_url}",
                f"Web UI:    {ui_address(local.api_url, local.api_key)}",
                f"Database:  {local.database}",
                f"Endpoint:  {endpoint_url} (for calls that name none)",
                "",
                "Run your application with:",
                *(f"export {name}={shlex.quote(value)}" for name, value in exports.items()),
                "",
                console.paint(READY_LINE, Style.BOLD),
            ]
            for line in lines:
                console.line(line)
            port = int(local.api_url.rpartition(":")[2])
            if (warning := exposure_warning(settings.host, port)) is not None:
                console.line(console.paint(f"warning: {warning}", Style.YELLOW, err=True), err=True)
            await stop.wait()
            unfinished = tracker.counts().unfinished
            if unfinished and not settings.in_memory:
                note = f": {plural(unfinished, 'unfinished call')} resume at the next start"
            elif unfinished:
                note = f": {plural(unfinished, 'unfinished call')} dropped (--in-memory)"
            else:
                note = ""
            console.line(f"stopping{note}", err=True)
        return 0
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _running_api(args: argparse.Namespace) -> tuple[str, str] | None:
    """Return the API URL and key of the scheduler to inspect, or None if none runs."""
    url = args.api_url or os.environ.get("DISPATCH_API_URL")
    key = args.api_key or os.environ.get("DISPATCH_API_KEY")
    if not url:
        found = read_connection(args.data_dir)
        if found is not None:
            url, key = found[0], args.api_key or found[1]
    if not url:
        return None
    if not key:
        raise CliError(
            f"no API key for the scheduler at {url}: pass --api-key or set DISPATCH_API_KEY",
            code=2,
        )
    return url, key


def _api(args: argparse.Namespace) -> tuple[str, str]:
    """Return the API URL and key of the running scheduler, or fail: none runs."""
    api = _running_api(args)
    if api is None:
        raise CliError(
            "no scheduler runs: pass --api-url and --api-key, or set DISPATCH_API_URL and "
            f"DISPATCH_API_KEY (as `{PROG} server` prints them), or run this where "
            f"`{PROG} run` or `{PROG} server` keeps its data ({args.data_dir})",
            code=2,
        )
    return api


@contextlib.asynccontextmanager
async def _inspected(
    args: argparse.Namespace, console: Console, *, offline: bool = True
) -> AsyncIterator[tuple[InspectClient, str]]:
    """A client of the scheduler to inspect: the running one, else its database."""
    explicit = getattr(args, "database", None)
    api = None if explicit else _running_api(args) if offline else _api(args)
    if api is not None:
        async with InspectClient(*api) as client:
            yield client, api[0]
        return
    database = explicit or os.environ.get(DATABASE_ENV, "").strip()
    async with (
        offline_api(args.data_dir, console, database) as (url, key),
        InspectClient(url, key) as client,
    ):
        yield client, url


async def _calls_command(args: argparse.Namespace, console: Console) -> int:
    if args.limit < 0:
        raise CliError(f"invalid --limit {args.limit}: use 0 (all) or more", code=2)
    if args.watch is not None and not args.watch > 0:
        raise CliError(f"invalid --watch {args.watch:g}: give seconds between refreshes", 2)
    selected = CallFilter(tuple(args.state or ()), tuple(args.status or ()))
    async with _inspected(args, console) as (client, _):
        if args.watch is None:
            return await _list_calls(args, selected, client, console)
        while True:  # until Ctrl-C
            if not console.clear_screen():  # not a terminal: one listing after another
                console.line(f"-- {time.strftime('%H:%M:%S')}")
            await _list_calls(args, selected, client, console)
            await asyncio.sleep(args.watch)


async def _list_calls(
    args: argparse.Namespace, selected: CallFilter, client: InspectClient, console: Console
) -> int:
    request = selected.request()
    request.root_dispatch_id = args.root or ""
    # Filters look at every call: a child failing shows, under its top-level call.
    request.top_level_only = not (args.all or args.root or selected.active)
    found: collections.deque[inspect_pb2.CallInfo] = collections.deque(maxlen=args.limit or None)
    total = 0
    roots: dict[str, inspect_pb2.CallInfo] = {}
    try:
        while True:
            page = await client.list_calls(request)
            found.extend(page.calls)
            total += len(page.calls)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        if selected.active and not args.all:
            for root_id in {c.root_dispatch_id for c in found if c.parent_dispatch_id}:
                query = inspect_pb2.ListCallsRequest(
                    root_dispatch_id=root_id, top_level_only=True, omit_payloads=True
                )
                roots.update((c.dispatch_id, c) for c in (await client.list_calls(query)).calls)
    except InspectError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        console.line(calls_document(found, total))
        return 0
    if not found:
        console.line("no calls", err=True)
        return 0
    if selected.active and not args.all:
        lines = render_filtered(list(found), roots, console)
    else:
        lines = render_calls(found, console)
    for line in lines:
        console.line(line)
    if total > len(found):
        console.line(f"(the last {len(found)} of {total} calls; --limit 0 shows all)", err=True)
    return 0


async def _cancel_command(args: argparse.Namespace, console: Console) -> int:
    async with _inspected(args, console, offline=False) as (client, url):
        try:
            dispatch_id = await resolve_id(client, args.dispatch_id)
            reply = await client.cancel_call(dispatch_id)
        except CallNotFoundError:
            raise CliError(
                f"no call with dispatch id {args.dispatch_id!r} in the scheduler at {url}; "
                f"`{PROG} calls` lists them"
            ) from None
        except InspectError as exc:
            raise CliError(str(exc)) from None
    if args.json:
        console.line(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True))
    elif reply.cancelled:
        console.line(f"cancelled {dispatch_id} ({plural(reply.stopped, 'call')} stopped)")
    else:
        console.line(f"{dispatch_id} had finished already: nothing to cancel")
    return 0


async def _show_command(args: argparse.Namespace, console: Console) -> int:
    if args.depth < 0:
        raise CliError(f"invalid --depth {args.depth}: use 0 (all levels) or more", code=2)
    async with _inspected(args, console) as (client, url):
        try:
            dispatch_id = await resolve_id(client, args.dispatch_id)
            tree = await client.get_call(dispatch_id, args.depth)
        except CallNotFoundError:
            raise CliError(
                f"no call with dispatch id {args.dispatch_id!r} in the scheduler at {url}; "
                f"`{PROG} calls` lists them"
            ) from None
        except InspectError as exc:
            raise CliError(str(exc)) from None
    if args.json:
        console.line(tree_document(tree))
        return 0
    for line in render_tree(tree, console, max_children=0 if args.all else 20):
        console.line(line)
    return 0


async def _call_command(args: argparse.Namespace, console: Console) -> int:
    try:
        check_function_name(args.function)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    if args.timeout is not None and not args.timeout > 0:
        raise CliError(f"invalid --timeout {args.timeout:g}: it must be positive", code=2)
    endpoint = args.endpoint or os.environ.get("DISPATCH_ENDPOINT_URL", "")
    call = Call(args.function, parse_arguments(args.arguments), endpoint=endpoint or None)
    async with _inspected(args, console, offline=False) as (client, _):
        try:
            (dispatch_id,) = await client.dispatch([call._to_proto(endpoint)])
        except InspectError as exc:
            raise CliError(str(exc)) from None
        if not args.wait:
            console.line(dispatch_id)
            return 0
        console.line(dispatch_id, err=True)
        try:
            info = await client.wait_call(dispatch_id, args.timeout)
        except InspectError as exc:
            raise CliError(str(exc)) from None
    if info.state != inspect_pb2.CALL_STATE_DONE:
        raise CliError(
            f"call {dispatch_id} still runs after {args.timeout:g} s; `{PROG} show "
            f"{dispatch_id[:12]}` follows it"
        )
    text = describe_result(info.result, info.status, 0)
    if info.status != int(Status.OK) or info.result.HasField("error"):
        console.line(console.paint(text, Style.RED, err=True), err=True)
        return 1
    console.line(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
