"""Fresh-process replay: each Run request runs in a new Python process.

`dispatch_aio.testing.Environment` with ``replay="process"`` hands every Run
request to `WorkerPool`, which runs it in a new process that knows nothing
but the request, as a scheduler that restarts the app before every resume would.
Values, errors and journals then cross a process boundary at every round, so a
class that does not survive the trip (pickled by value, rebuilt as a look-alike)
shows up as a failing ``isinstance`` or ``except``, as it would in production.

The new interpreter finds the functions by reference: the module and attribute
of the `Dispatch` (or of the `Function`) found in the parent, imported on the
parent's ``sys.path``. The parent's main script is loaded first as
``__mp_main__`` and aliased as ``__main__``, as multiprocessing's spawn does, so
pickled ``__main__.X`` references resolve; its classes and functions say they are
``__main__``'s, as in the program itself, so the worker pickles them as the
program would (not by reference to ``__mp_main__``, which would hide a by-value
look-alike).

Starting an interpreter and importing the SDK takes a few tenths of a second, so
on Linux a worker is forked from a server that has done those imports and nothing
else (`_fork_server`); and the pool keeps spare workers that have loaded the
program's modules and wait for exactly one request. The protocol, on the worker's
stdin and stdout, is a sequence of messages, each a 4-byte big-endian length and a
binary protobuf:

1. parent to worker: a ``Struct``, the setup (``path``, ``main``, ``modules``);
2. parent to worker: a ``Struct``, the job (``target``, ``modules``, ``time``),
   then the ``RunRequest``;
3. worker to parent: a ``Struct``, the outcome (``time``: where the worker's
   virtual clock ended; ``logs``: the log records), then the ``RunResponse``.

The worker exits after answering. Its loggers have the parent's levels, and the
records they emit are handled again by the parent's loggers (so pytest's
``caplog`` sees them). What the program prints goes to the worker's stderr,
which the parent copies to its own stderr, and shows in the error when the
worker fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import runpy
import struct
import subprocess
import sys
import threading
import traceback
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

from google.protobuf import json_format, struct_pb2

from . import _fork_server

if TYPE_CHECKING:
    from ._dispatch import Dispatch
    from ._function import Function

__all__ = [
    "Setup",
    "Target",
    "WorkerError",
    "WorkerPool",
    "load_main",
    "locate",
    "main",
    "module_file",
]

# Run by the new interpreter: the worker module is imported under its own name, so the
# program's main script can take the place of __main__.
_BOOT = "from dispatch_aio._replay_worker import main; main()"
_HEADER = struct.Struct(">I")
_MAIN_NAMES = ("__main__", "__mp_main__")
# Set in the environment of workers, so that a worker that would start workers itself (a
# main script that runs its tests when loaded) fails instead of multiplying.
_IN_WORKER = "DISPATCH_AIO_REPLAY_WORKER"


class WorkerError(Exception):
    """A fresh process could not run a request: the worker crashed, or could not find the code.

    The message names the function and includes the worker's stderr.
    """

    __module__ = "dispatch_aio.testing"  # where users find it


# -- what the worker is told ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a new interpreter needs before any request: where the code is."""

    path: tuple[str, ...]
    """The parent's ``sys.path``."""
    main: tuple[str, str] | None
    """The parent's main program: ``("path", file)`` or ``("module", name)``; None if none."""
    modules: tuple[tuple[str, str], ...]
    """Modules to import ahead, as ``(name, file)``; the file when the name does not import."""

    @classmethod
    def current(cls, modules: Iterable[tuple[str, str]]) -> Setup:
        """Return the setup of this process, importing ``modules`` ahead."""
        return cls(tuple(sys.path), _main_program(), tuple(modules))

    @property
    def key(self) -> tuple[object, ...]:
        """What a spare worker must share with a request to run it."""
        return (self.path, self.main)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a new interpreter finds a function: an attribute of an importable module."""

    function: str
    """Name the function is registered under."""
    module: str
    """Module holding the `Dispatch` or the `Function`."""
    attr: str
    """Attribute of ``module``."""
    kind: Literal["dispatch", "function"]
    """Whether the attribute is the `Dispatch` or the `Function` itself."""
    code: str
    """``module:qualname`` of the function's code, to check the worker finds the same."""


def _main_program() -> tuple[str, str] | None:
    # As multiprocessing's spawn: the main module by name if run with -m, else its file.
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str):
        return ("module", name)
    path = getattr(main, "__file__", None)
    if isinstance(path, str):
        return ("path", os.path.abspath(path))
    return None


def module_file(name: str) -> tuple[str, str]:
    """Return ``(name, file)`` for a loaded module; the file is empty when it has none."""
    file = getattr(sys.modules.get(name), "__file__", None)
    return (name, file if isinstance(file, str) else "")


def _code(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    module = "__main__" if module in _MAIN_NAMES else module
    return f"{module}:{getattr(fn, '__qualname__', '?')}"


def _attribute_of(module_name: str, obj: object) -> str | None:
    module = sys.modules.get(module_name)
    if module is None:
        return None
    for name, value in list(vars(module).items()):
        if value is obj:
            return name
    return None


def locate(fn: Function[Any, Any], owner: Dispatch | None, near: Iterable[str] = ()) -> Target:
    """Find how a new interpreter can import ``fn``: through ``owner``, or as itself.

    Args:
        fn: The registered function.
        owner: The `Dispatch` the environment runs, if it runs one.
        near: Other modules to search for ``owner`` (those of its other functions).

    Raises:
        WorkerError: Neither is a module-level name of an importable module; the
            message says what to do.
    """
    module = getattr(fn.fn, "__module__", None) or "?"
    where = f"{fn.name!r} ({_code(fn.fn)})"
    if module in _MAIN_NAMES:
        program = _main_program()
        if program is None or (program[0] == "module" and program[1].endswith("__main__")):
            raise WorkerError(
                f"function {where} is defined in the main module of a program that a new "
                "interpreter cannot load again (an interactive session, python -c, a notebook "
                "or a package's __main__.py): define it in an importable module to run it with "
                "replay='process'"
            )
        module = "__main__"
    if owner is not None:
        places = [module, *near]
        if _main_program() is not None:
            places.append("__main__")
        for candidate in dict.fromkeys(places):
            attr = _attribute_of(candidate, owner)
            if attr is not None:
                return Target(fn.name, candidate, attr, "dispatch", _code(fn.fn))
        raise WorkerError(
            f"function {where}: a new interpreter finds functions through their Dispatch, and "
            f"this Dispatch is not a module-level name of {module!r}; assign it to a global of "
            "the module that defines the functions to run it with replay='process'"
        )
    attr = _attribute_of(module, fn)
    if attr is None:
        raise WorkerError(
            f"function {where} is not a module-level name of {module!r}, so a new interpreter "
            "cannot import it (it was made inside a function or a test?): define it at module "
            "level, or stub it with Environment.stub (stubs run in process)"
        )
    return Target(fn.name, module, attr, "function", _code(fn.fn))


# -- framing --------------------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


def _struct(fields: Mapping[str, Any]) -> bytes:
    message = struct_pb2.Struct()
    message.update(fields)
    return message.SerializeToString()


def _fields(data: bytes) -> dict[str, Any]:
    return json_format.MessageToDict(struct_pb2.Struct.FromString(data))


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _split_frames(data: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset + _HEADER.size <= len(data):
        (size,) = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        if offset + size > len(data):
            break
        frames.append(data[offset : offset + size])
        offset += size
    return frames


# -- the pool (parent side) -----------------------------------------------------------------


class _Process(Protocol):
    """A worker: a new interpreter (`subprocess.Popen`) or a `_fork_server.ForkedProcess`."""

    @property
    def stdin(self) -> IO[bytes] | None: ...
    def poll(self) -> int | None: ...
    def wait(self) -> int: ...
    def kill(self) -> None: ...
    def communicate(self, data: bytes = ..., timeout: float | None = ...) -> tuple[Any, Any]: ...


class _Ticket:
    """One request's claim on a worker, so that cancelling the request kills the worker."""

    def __init__(self) -> None:
        self.cancelled = False
        self.process: _Process | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None:
            _kill(self.process)


def _kill(process: _Process) -> None:
    if process.poll() is None:
        process.kill()


class WorkerPool:
    """Workers that each run one Run request in a new process, with spares started ahead.

    On Linux a worker is forked from a server process that has imported the SDK
    (and `preload`) and nothing of the program: it then loads the program's modules
    itself, as a new interpreter would, for about a millisecond of CPU instead of a
    few tenths of a second. Two servers, each with its own hash seed, take turns, so
    consecutive requests see different ``str`` hashes, as restarted apps would.
    Elsewhere, or with ``method="spawn"``, each worker is a new interpreter.

    A spare has started, loaded the program's modules, and waits for its request,
    so a request does not wait for them to load. The pool is not bound to an event
    loop: one pool can serve the tests of a whole session. Close it to stop the spares.

    Args:
        spares: Workers kept started ahead.
        max_running: Most requests run at once (further ones wait); defaults
            to the number of CPUs.
        python: The interpreter to start; defaults to this one.
        method: ``"forkserver"`` (the default where available) or ``"spawn"``.
        preload: Modules the fork servers import besides the SDK: third-party
            libraries the program imports (never the program's own modules, which
            each worker must load itself).
    """

    __module__ = "dispatch_aio.testing"  # where users find it

    def __init__(
        self,
        *,
        spares: int = 1,
        max_running: int | None = None,
        python: str | None = None,
        method: Literal["forkserver", "spawn"] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        if method not in (None, "forkserver", "spawn"):
            raise ValueError(f"method must be 'forkserver' or 'spawn', not {method!r}")
        if method == "forkserver" and not _fork_server.available():
            raise ValueError(f"method='forkserver' is not available on {sys.platform}")
        self._spares_wanted = spares
        self._max_running = max(1, max_running or os.cpu_count() or 2)
        self._python = python or sys.executable
        self._fork = method != "spawn" and _fork_server.available()
        self._preload = tuple(preload)
        self._servers: list[_fork_server.ForkServer] = []
        self._turn = 0
        self._lock = threading.Lock()
        self._spares: list[tuple[tuple[object, ...], _Process]] = []
        self._running: set[_Process] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self.started = 0
        """Number of worker processes started so far."""

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def run(
        self,
        setup: Setup,
        target: Target,
        start: float | None,
        request: bytes,
        options: Mapping[str, str | bool] | None = None,
    ) -> tuple[float | None, bytes]:
        """Run one serialized RunRequest in a new interpreter.

        Args:
            setup: Where the code is (`Setup.current`).
            target: The function to run (`locate`).
            start: Virtual time to start the worker's clock at; None for the real clock.
            request: The serialized RunRequest.
            options: Options of the worker's `Runner` (``on_divergence``,
                ``nondeterminism``, ``perturb_time``).

        Returns:
            The worker's virtual time at the end (None on the real clock), and
            the serialized RunResponse.

        Raises:
            WorkerError: The worker failed; the message has its stderr.
        """
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if os.environ.get(_IN_WORKER):
            raise WorkerError(
                "a replay worker loaded the main script, and the script ran calls with "
                "replay='process' again: put the code that runs them under "
                "`if __name__ == '__main__':`"
            )
        job: dict[str, Any] = {
            "target": dataclasses.asdict(target),
            "modules": [list(m) for m in setup.modules],
            "levels": _levels(),
        }
        if start is not None:
            job["time"] = start
        if options:
            job["runner"] = dict(options)
        payload = _frame(_struct(job)) + _frame(request)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._max_running, thread_name_prefix="dispatch-replay-worker"
            )
        ticket = _Ticket()
        loop = asyncio.get_running_loop()
        try:
            code, out, err = await loop.run_in_executor(
                self._executor, self._work, ticket, setup, payload
            )
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        text = err.decode("utf-8", "replace")
        frames = _split_frames(out)
        if code != 0 or len(frames) != 2:
            status = f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
            raise WorkerError(
                f"the new interpreter that ran function {target.function!r} failed "
                f"({status}); its stderr:\n{text.rstrip() or '(empty)'}"
            )
        if text:
            sys.stderr.write(text)
        outcome = _fields(frames[0])
        for fields in outcome.get("logs", []):
            _log_again(fields)
        end = outcome.get("time")
        return (None if end is None else float(end)), frames[1]

    def close(self) -> None:
        """Stop the spares and any worker still running; wait for them to exit."""
        with self._lock:
            self._closed = True
            processes = [p for _, p in self._spares] + list(self._running)
            self._spares.clear()
        for process in processes:
            _kill(process)
        for process in processes:
            _reap(process)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.close()

    # In a thread of the executor: spawning and waiting block.
    def _work(self, ticket: _Ticket, setup: Setup, payload: bytes) -> tuple[int, bytes, bytes]:
        process = self._take(setup) or self._spawn(setup)
        with self._lock:
            self._running.add(process)
            ticket.process = process
            closed = self._closed
        try:
            if ticket.cancelled or closed:
                _kill(process)
            self._refill(setup)
            out, err = process.communicate(payload)
        finally:
            with self._lock:
                self._running.discard(process)
        return process.wait(), out, err  # ended: communicate() waited for it

    def _take(self, setup: Setup) -> _Process | None:
        stale = []
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            found = None
            for key, process in self._spares:
                if found is None and key == setup.key and process.poll() is None:
                    found = process
                elif key != setup.key or process.poll() is not None:
                    stale.append(process)
            self._spares = [(k, p) for k, p in self._spares if p is not found and p not in stale]
        for process in stale:  # started for another sys.path or program
            _kill(process)
            _reap(process)
        return found

    def _refill(self, setup: Setup) -> None:
        with self._lock:
            missing = self._spares_wanted - len(self._spares)
        for _ in range(missing):
            process = self._spawn(setup)
            with self._lock:
                if self._closed:
                    _kill(process)
                else:
                    self._spares.append((setup.key, process))
                    continue
            _reap(process)

    def _spawn(self, setup: Setup) -> _Process:
        env = {**os.environ, _IN_WORKER: "1"}
        process = self._forked(env) if self._fork else None
        if process is None:
            process = subprocess.Popen(
                [self._python, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        with self._lock:
            self.started += 1
        fields = {
            "path": list(setup.path),
            "main": list(setup.main) if setup.main else [],
            "modules": [list(m) for m in setup.modules],
        }
        assert process.stdin is not None
        try:
            process.stdin.write(_frame(_struct(fields)))
            process.stdin.flush()
        except BrokenPipeError:
            pass  # it died at start: communicate() reports its stderr
        return process

    def _forked(self, env: Mapping[str, str]) -> _Process | None:
        """Fork a worker from the next server; None if the servers fail (spawn instead)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if not self._servers:
                self._servers = [
                    _fork_server.ForkServer(self._python, self._preload, env) for _ in range(2)
                ]
            server = self._servers[self._turn % len(self._servers)]
            self._turn += 1
        try:
            cwd: str | None = os.getcwd()
        except OSError:  # removed: the worker stays where the server is
            cwd = None
        try:
            return server.fork(env, cwd)
        except OSError:
            # The server died (it could not import the SDK, or was killed): from now
            # on new interpreters, whose stderr says what fails.
            self._fork = False
            return None


def _levels() -> dict[str, int]:
    """The levels set on this process's loggers ("" for the root), for the worker to use."""
    levels = {"": logging.root.level}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level:
            levels[name] = logger.level
    return levels


def _log_again(fields: Mapping[str, Any]) -> None:
    # Struct numbers are doubles: the integer fields come back as floats.
    integers = {key: int(fields[key]) for key in ("levelno", "lineno", "process") if key in fields}
    record = logging.makeLogRecord({**fields, **integers})
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def _reap(process: _Process) -> None:
    # communicate() closes the pipes and waits, so nothing is left to the garbage collector.
    try:
        process.communicate(timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        process.wait()


# -- the worker -----------------------------------------------------------------------------


class _Refusal(Exception):
    """The request names code the new interpreter cannot find: a message, no traceback."""


def main() -> None:
    """Run one request read from stdin and answer on stdout (the new interpreter's side)."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the program's prints go to stderr, never into the protocol
    # Import the SDK while the parent has not sent anything yet: that is what a spare is for.
    from . import testing  # noqa: F401

    source = sys.stdin.buffer
    data = _read_frame(source)
    if data is None:
        os._exit(0)
    problems = _prepare(_fields(data))
    job_data, request = _read_frame(source), _read_frame(source)
    if job_data is None or request is None:
        os._exit(0)  # dismissed spare
    code = 0
    try:
        if problems:
            raise problems[0]
        job = _fields(job_data)
        records = _keep_logs(job.get("levels", {}))
        end, response = asyncio.run(_serve(job, request))
        outcome: dict[str, Any] = {"logs": [_record_fields(r) for r in records]}
        if end is not None:
            outcome["time"] = end
        channel.write(_frame(_struct(outcome)) + _frame(response))
        channel.flush()
    except _Refusal as exc:
        sys.stderr.write(f"dispatch_aio replay worker: {exc}\n")
        code = 3
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: threads the program left behind must not keep the worker alive.
    os._exit(code)


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _keep_logs(levels: Mapping[str, Any]) -> list[logging.LogRecord]:
    """Keep the records the parent's loggers would handle, to send them back."""
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(int(level))
    records: list[logging.LogRecord] = []
    logging.root.addHandler(_Keep(records))
    return records


_RECORD_FIELDS = (
    *("name", "levelno", "levelname", "pathname", "filename", "module", "lineno", "funcName"),
    *("created", "msecs", "process", "processName", "threadName"),
)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {key: getattr(record, key) for key in _RECORD_FIELDS}
    fields["msg"] = record.getMessage()
    if record.exc_info:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        fields["exc_text"] = record.exc_text
    if record.stack_info:
        fields["stack_info"] = record.stack_info
    return fields


def _prepare(setup: Mapping[str, Any]) -> list[BaseException]:
    """Set sys.path, load the main program, import the modules; return what failed."""
    sys.path[:] = list(setup.get("path", []))
    problems: list[BaseException] = []
    main = setup.get("main") or None
    if main is not None:
        try:
            load_main(str(main[0]), str(main[1]))
        except BaseException as exc:
            problems.append(exc)
    for name, file in setup.get("modules", []):
        # A module the request needs is imported again then, and fails there.
        with contextlib.suppress(BaseException):
            _import(name, file)
    return problems


def load_main(kind: str, name: str) -> types.ModuleType:
    """Load a program's main script (``kind`` "file") or module as this process's ``__main__``.

    As multiprocessing's spawn does: it runs as ``__mp_main__`` (so its ``if __name__ ==
    "__main__":`` block does not run) and is aliased as ``__main__``, so values the program
    pickled as ``__main__.X`` resolve, and values made here pickle as the program's would.
    """
    if kind == "module":
        if name == "__main__" or name.endswith(".__main__"):
            return sys.modules["__main__"]  # a package's __main__ runs its program: keep it
        content = runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
    else:
        content = runpy.run_path(name, run_name="__mp_main__")
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    # In the program itself these are __main__'s, and values of theirs are pickled as
    # such (by value, unless the codec knows better): here too, or the worker would
    # pickle them by reference to __mp_main__ and hide what a restarted app would see.
    seen: set[int] = set()
    for value in content.values():
        _claim_for_main(value, seen)
    return module


def _claim_for_main(value: object, seen: set[int]) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    wrapped = getattr(value, "__wrapped__", None)  # a Function's code
    if wrapped is not None and not isinstance(value, type):
        _claim_for_main(wrapped, seen)
    if not isinstance(value, type | types.FunctionType):
        return
    if getattr(value, "__module__", None) != "__mp_main__":
        return
    value.__module__ = "__main__"
    if isinstance(value, type):
        for member in list(vars(value).values()):
            _claim_for_main(member, seen)


def _import(name: str, file: str) -> types.ModuleType:
    if name == "__main__":
        module = sys.modules["__main__"]
        if module.__name__ != "__mp_main__":
            raise _Refusal("the parent's main program could not be loaded")
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not file or not (name == missing or name.startswith(missing + ".")):
            raise
    # A module the parent loaded from a file under a name of its own (importlib's
    # spec_from_file_location): load it the same way.
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise _Refusal(f"module {name!r} cannot be loaded from {file!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


async def _serve(job: Mapping[str, Any], data: bytes) -> tuple[float | None, bytes]:
    from ._dispatch import Dispatch
    from ._function import Function
    from ._status import Classifier
    from .durable import Clock, Runner
    from .proto.sdk.v1 import function_pb2
    from .testing import VirtualClock

    for name, file in job.get("modules", []):
        _import(name, file)
    target = Target(**job["target"])
    holder = getattr(_import(target.module, ""), target.attr, None)
    place = f"{target.module}.{target.attr}"
    classifier = Classifier()
    if target.kind == "dispatch":
        if not isinstance(holder, Dispatch):
            raise _Refusal(f"{place} is not a Dispatch in a new interpreter")
        fn = holder.functions.get(target.function)
        classifier = holder._classifier
        if fn is None:
            raise _Refusal(
                f"function {target.function!r} is not registered on {place} when "
                f"{target.module!r} is imported in a new interpreter: it was registered at run "
                "time (inside a function or a test?); register it at module level to run it "
                "with replay='process'"
            )
    else:
        fn = holder
        if not isinstance(fn, Function):
            raise _Refusal(f"{place} is not a registered function in a new interpreter")
    found = _code(fn.fn)
    if found != target.code:
        raise _Refusal(
            f"function {target.function!r} is {target.code} in the parent but {found} in a "
            "new interpreter: the module registers another function under that name when "
            "imported"
        )
    clock: Clock = Clock() if job.get("time") is None else VirtualClock(float(job["time"]))
    functions: Mapping[str, Callable[..., Awaitable[Any]]] = {target.function: fn.fn}
    options = job.get("runner", {})
    runner = Runner(functions.get, classifier=classifier, cache_size=0, clock=clock, **options)
    try:
        response = await runner.run(function_pb2.RunRequest.FromString(data))
    finally:
        await runner.aclose()
        if isinstance(clock, VirtualClock):
            await clock.aclose()
    end = clock.time() if isinstance(clock, VirtualClock) else None
    return end, response.SerializeToString()
