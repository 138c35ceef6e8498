"""``dispatch-aio run``: the local scheduler and an application, together.

The application is started in a process group of its own with the ``DISPATCH_*``
variables that point it at the scheduler (and ``PYTHONUNBUFFERED=1`` unless set, so that
a Python application's prints show up as they happen). Its standard output and error
are copied line by line with a prefix. SIGINT, SIGTERM and SIGHUP are passed on to its
process group; a second signal kills the group. The command ends when the application
does, with its exit status (128 + N when signal N ended it, as shells report it).
"""

from __future__ import annotations

__all__ = ["RunOptions", "program_name", "run_app"]

import asyncio
import codecs
import collections
import contextlib
import ctypes
import dataclasses
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._logs import LOG_FORMAT
from .._serving import tune_garbage_collector
from ..scheduler._ui import ui_address
from ._console import Console, Style
from ._progress import CallTracker, Progress
from ._scheduler import (
    CliError,
    LocalScheduler,
    SchedulerSettings,
    check_endpoint_free,
    endpoint_url_for,
    exposure_warning,
    format_addr,
    parse_addr,
)

_OUR_NAME = "dispatch"
_MAX_NAME = 16
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
# A signal repeated within this many seconds is the same request, not a second one.
_REPEAT_WINDOW = 0.1
_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_KEPT_ERRORS = 20  # last error lines of the app, read for a hint when it fails
_CHUNK = 64 * 1024
_DRAIN_TIMEOUT = 2.0  # seconds to read what the application wrote before it exited
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PYTHON = re.compile(r"(python|pypy)[0-9.]*")
_OPTIONS_WITH_VALUE = frozenset({"-X", "-W", "-Q"})


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What ``dispatch-aio run`` was asked to do."""

    command: Sequence[str]
    """The application's command line."""
    scheduler: SchedulerSettings
    """How to run the scheduler (its `endpoint_url` is set from `endpoint`)."""
    endpoint: str = "127.0.0.1:8000"
    """``HOST:PORT`` the application serves its endpoint on (port 0: a free one)."""
    name: str | None = None
    """Prefix of the application's lines; default: from the command."""
    log_format: str = "text"
    """How the application's default log handler writes records: 'text' or 'json'."""


def program_name(command: Sequence[str]) -> str:
    """Return a short name for an application's lines: ``app`` for ``python app.py``."""
    base = os.path.basename(command[0]) if command else "app"
    if _PYTHON.fullmatch(base):
        rest = list(command[1:])
        skip = False
        for i, arg in enumerate(rest):
            if skip:
                skip = False
            elif arg == "-m" and i + 1 < len(rest):
                return rest[i + 1][:_MAX_NAME]
            elif arg.startswith("-m") and len(arg) > 2:
                return arg[2:][:_MAX_NAME]
            elif arg in _OPTIONS_WITH_VALUE:
                skip = True
            elif arg == "-c":
                break
            elif not arg.startswith("-"):
                return (Path(arg).stem or base)[:_MAX_NAME]
    return base[:_MAX_NAME] or "app"


def _check_program(program: str) -> None:
    """Fail early, with the statuses shells use, when the program cannot be started."""
    if os.sep in program:
        path = Path(program)
        if not path.exists():
            raise CliError(f"cannot run {program!r}: no such file", code=127)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise CliError(
                f"cannot run {program!r}: it is not an executable file (check its permissions)",
                code=126,
            )
    elif shutil.which(program) is None:
        raise CliError(
            f"command not found: {program!r}; check the spelling, or that it is installed and "
            "on your PATH",
            code=127,
        )


class _Signals:
    """Passes the first signal on to the application's process group; the second kills it."""

    def __init__(self, console: Console, prefix: str) -> None:
        self._console = console
        self._prefix = prefix
        self._loop = asyncio.get_running_loop()
        self._installed: list[signal.Signals] = []
        self.pid: int | None = None
        self.count = 0
        self.first: signal.Signals | None = None
        self.received = asyncio.Event()
        self._last = 0.0

    def install(self) -> None:
        for sig in _FORWARDED:
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signals on this platform
            self._installed.append(sig)

    def uninstall(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self.count and now - self._last < _REPEAT_WINDOW:
            # The same request delivered twice (GNU timeout signals the process and
            # its group): not a second request.
            return
        self._last = now
        self.count += 1
        self.first = self.first or sig
        self.received.set()
        if self.pid is None:
            return
        if self.count == 1:
            self._say(f"{sig.name} received: passing it on to the application (again to kill it)")
            self._kill(sig)
        else:
            self._say(f"{sig.name} received again: killing the application")
            self._kill(signal.SIGKILL)

    def _kill(self, sig: signal.Signals) -> None:
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _say(self, text: str) -> None:
        self._console.line(self._prefix + text)


async def _pump(
    stream: asyncio.StreamReader | None,
    console: Console,
    prefix: str,
    *,
    err: bool,
    keep: collections.deque[str] | None = None,
) -> None:
    """Copy a stream line by line, each line with `prefix` (the last ones into `keep`)."""
    if stream is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    while chunk := await stream.read(_CHUNK):
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            console.line(prefix + line.removesuffix("\r"), err=err)
            if keep is not None:
                keep.append(line)
        if len(pending) > _CHUNK:  # a very long line: show it in pieces
            console.line(prefix + pending, err=err)
            pending = ""
    pending += decoder.decode(b"", final=True)
    if pending:
        console.line(prefix + pending, err=err)


def _failure_hint(command: list[str], last_errors: collections.deque[str]) -> str | None:
    """Say what to do about a failure whose cause the app's last error lines show."""
    missing = [m[1] for line in last_errors if (m := _MISSING_MODULE.search(line))]
    if not missing:
        return None
    program = shutil.which(command[0]) or command[0]
    ours = os.path.abspath(sys.executable)
    if missing[-1] != "dispatch_aio" and (
        not _PYTHON.fullmatch(os.path.basename(program)) or os.path.abspath(program) == ours
    ):
        return None  # a module the app lacks, in the right Python: its own business
    return (
        f"{command[0]!r} cannot import {missing[-1]!r}: is it the Python dispatch-aio is "
        f"installed in? Run the app with that one: dispatch-aio run -- "
        f"{shlex.quote(sys.executable)} {shlex.join(command[1:])}"
    )


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was ended by {name} (exit status {128 - returncode})"


async def run_app(options: RunOptions, console: Console) -> int:
    """Run the scheduler and the application until the application ends.

    Returns:
        The application's exit status.

    Raises:
        CliError: Nothing to run, the program cannot be found, the endpoint address is
            in use, or the scheduler cannot start.
    """
    command = list(options.command)
    if not command:
        raise CliError("no command to run: dispatch-aio run [OPTIONS] -- CMD [ARGS...]", code=2)
    _check_program(command[0])
    host, port = parse_addr(options.endpoint, "--endpoint")
    port = check_endpoint_free(host, port)
    endpoint_addr = format_addr(host, port)
    endpoint_url = endpoint_url_for(host, port)

    name = options.name or program_name(command)
    width = max(len(name), len(_OUR_NAME))
    ours = console.paint(f"{_OUR_NAME.ljust(width)} | ", Style.MAGENTA)
    app_out = console.paint(f"{name.ljust(width)} | ", Style.CYAN)
    app_err = console.paint(f"{name.ljust(width)} | ", Style.CYAN, err=True)

    signals = _Signals(console, ours)
    signals.install()
    try:
        tracker = CallTracker()
        settings = dataclasses.replace(options.scheduler, endpoint_url=endpoint_url)
        async with LocalScheduler(settings, tracker) as local:
            if signals.received.is_set():
                return _exit_status(-(signals.first or signal.SIGINT))
            tune_garbage_collector()  # the process is ours: see `_serving`
            # The engine's own set: no query of the calls at each refresh.
            progress = Progress(console, tracker, prefix=ours, running=local.running)
            console.line(f"{ours}scheduler API on {local.api_url}, calls kept in {local.database}")
            console.line(f"{ours}web UI on {ui_address(local.api_url, local.api_key)}")
            api_port = int(local.api_url.rpartition(":")[2])
            if (warning := exposure_warning(settings.host, api_port)) is not None:
                console.line(
                    ours + console.paint(f"warning: {warning}", Style.YELLOW, err=True),
                    err=True,
                )
            console.line(
                f"{ours}starting {shlex.join(command)} (endpoint {endpoint_url}, "
                f"DISPATCH_ENDPOINT_ADDR={endpoint_addr})"
            )
            env = dict(os.environ)
            env.update(
                DISPATCH_API_URL=local.api_url,
                DISPATCH_API_KEY=local.api_key,
                DISPATCH_ENDPOINT_URL=endpoint_url,
                DISPATCH_ENDPOINT_ADDR=endpoint_addr,
                DISPATCH_VERIFICATION_KEY=local.verification_key,
            )
            env.setdefault("PYTHONUNBUFFERED", "1")
            # The app prints its durable loggers' lines unless it configured logging.
            env[LOG_FORMAT] = options.log_format
            last_errors: collections.deque[str] = collections.deque(maxlen=_KEPT_ERRORS)
            returncode = await _supervise(
                command, env, console, signals, progress, app_out, app_err, last_errors
            )
            console.line(f"{ours}{shlex.join(command)} {_describe_exit(returncode)}")
            if returncode and (hint := _failure_hint(command, last_errors)):
                hint_line = console.paint(f"hint: {hint}", Style.YELLOW, err=True)
                console.line(ours + hint_line, err=True)
            console.line(ours + _closing(progress, local))
        return _exit_status(returncode)
    finally:
        signals.uninstall()


async def _supervise(
    command: list[str],
    env: dict[str, str],
    console: Console,
    signals: _Signals,
    progress: Progress,
    app_out: str,
    app_err: str,
    last_errors: collections.deque[str],
) -> int:
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            process_group=0,  # its own group: signals reach it (and its children) from us only
            preexec_fn=_end_with_parent(),
        )
    except FileNotFoundError:
        raise CliError(f"command not found: {command[0]!r}", code=127) from None
    except OSError as exc:
        raise CliError(f"cannot run {command[0]!r}: {exc.strerror or exc}", code=126) from None
    signals.pid = process.pid
    pumps = [
        asyncio.create_task(_pump(process.stdout, console, app_out, err=False)),
        asyncio.create_task(_pump(process.stderr, console, app_err, err=True, keep=last_errors)),
    ]
    status = asyncio.create_task(progress.run())
    try:
        returncode = await process.wait()
        # Its own children may hold the pipes open: read what is there, not forever.
        _, late = await asyncio.wait(pumps, timeout=_DRAIN_TIMEOUT)
        for task in late:
            task.cancel()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        signals.pid = None
        status.cancel()
        for task in pumps:
            task.cancel()
        await asyncio.gather(status, *pumps, return_exceptions=True)
    return returncode


def _closing(progress: Progress, local: LocalScheduler) -> str:
    counts_text = progress.summary()
    unfinished = local.tracker.counts().unfinished
    if not unfinished:
        return counts_text
    if local.settings.in_memory:
        return f"{counts_text} (dropped: --in-memory keeps nothing)"
    return f"{counts_text} (kept in {local.database}: they resume at the next start)"


def _end_with_parent() -> Callable[[], None] | None:
    """Return what the child runs before exec to get SIGTERM when this command dies.

    Without it, an app whose ``dispatch-aio run`` is killed (kill -9, a closed
    terminal) would keep running, and keep its port. Linux only (PR_SET_PDEATHSIG);
    libc is resolved here, in the parent, so that the child, forked from a process
    with threads, only makes the system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    death_signal = int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)

    return set_death_signal
