"""End to end, side by side: dispatch-aio and dispatch-py 0.8.0, measured in the same run.

Each workload runs `--repeat` times on each of four systems, interleaved, each run on
fresh processes (so that peak memory is per run):

- dispatch-py: dispatch-py 0.8.0 in a virtualenv of its own (built as tests/interop
  builds it), in one process with its in-process test scheduler (``dispatch.test``: no
  persistence, no signatures); bench/peers/dispatch_py_bench.py.
- persistent: ``dispatch-aio server --data-dir`` (a SQLite file) and an application on
  this SDK served with ``dispatch.run()``, two processes; the scheduler signs every Run
  request and the application verifies every signature. This is real use.
- in-memory: the same with ``--in-memory``.
- embedded: the application alone (``python app.py``), its scheduler in process on a
  SQLite file (``synchronous=FULL``), Run requests handed over in memory; one process,
  as dispatch-py's (which keeps nothing).

Workloads: W1 one call gathers 1000 children (children/s); W2 one call makes 200
sequential calls (ms/step); W3 2000 top-level calls submitted one by one, and in one
batch (calls/s); W4 one call makes 10,000 sequential calls (ms/step), whose flatness is
the ms/step of its last tenth over that of its first tenth, from the times the steps ran.
Ratios are speed-ups against dispatch-py: above 1 we are faster. Progress lines go to
standard error, the table to standard output.

With ``--base-src DIR`` (the ``src`` folder of another checkout), two more systems run in
the same rounds: persistent-base and embedded-base, the same with dispatch_aio imported
from DIR; a second table gives this tree's speed-up against them.

    python bench/bench_e2e.py [--repeat 3] [--workloads w1,w2,w3one,w3batch,w4|all]
    python bench/bench_e2e.py --base-src ../old/src [--workloads w2]
    python bench/bench_e2e.py --profile DIR [--workloads w2]  # cProfile every process
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dispatch_aio._serving
from dispatch_aio import Dispatch, Function, Status
from dispatch_aio._codec import decode_value
from dispatch_aio.proto.v1 import inspect_pb2

if TYPE_CHECKING:
    # Imported where used: the served application loads what an application loads.
    import floor

    from dispatch_aio.cli._inspect import InspectClient

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).resolve().parent / "peers" / "dispatch_py_bench.py"
READY_LINE = "Ready. Press Ctrl+C to stop."
PROFILE_ENV = "BENCH_E2E_PROFILE"  # where a profiled process writes its cProfile stats
TIMEOUT = 900.0  # a stalled workload fails the benchmark rather than hanging it
SYSTEMS = ("dispatch-py", "persistent", "in-memory", "embedded")
# W4 is left out while our chain of 10,000 takes minutes (cost per step grows with it).
DEFAULT_WORKLOADS = "w1,w2,w3one,w3batch,w4"
OURS = ("persistent", "in-memory", "embedded")
BASE_SYSTEMS = ("persistent-base", "embedded-base")  # with --base-src
EMBEDDED_KEY = "bench-embedded"  # the embedded scheduler's API key (loopback only)
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
Marks = list[tuple[int, float]]  # (step index, time.monotonic() when that step ran)


# -- the application ----------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """The benchmark's functions, registered on one `Dispatch` object."""

    dispatch: Dispatch
    double: Function[[int], int]
    fan_out: Function[[int], int]
    chain: Function[[int], int]
    timed_chain: Function[[int, int], Marks]


def build_app(**config: Any) -> App:
    """Register the functions; the application serves them, the driver submits calls.

    bench/peers/dispatch_py_bench.py defines the same functions for dispatch-py.
    """
    dispatch = Dispatch(**config)

    async def _double(x: int) -> int:
        return 2 * x

    double = dispatch.function(name="double")(_double)

    async def _fan_out(n: int) -> int:
        return sum(await asyncio.gather(*(double(i) for i in range(n))))

    fan_out = dispatch.function(name="fan_out")(_fan_out)

    async def _add_one(x: int) -> int:
        return x + 1

    add_one = dispatch.function(name="add_one")(_add_one)

    async def _chain(n: int) -> int:
        x = 0
        for _ in range(n):
            x = await add_one(x)
        return x

    chain = dispatch.function(name="chain")(_chain)

    async def _stamp(x: int) -> tuple[int, float]:
        return x + 1, time.monotonic()  # system-wide clock: comparable across processes

    stamp = dispatch.function(name="stamp")(_stamp)

    async def _timed_chain(n: int, every: int) -> Marks:
        # When every `every`-th step (and the last) ran: a few marks, so that the state
        # carried from step to step does not grow with them.
        x = 0
        marks = []
        for i in range(n):
            x, at = await stamp(x)
            if i % every == 0 or i == n - 1:
                marks.append((i, at))
        return marks

    timed_chain = dispatch.function(name="timed_chain")(_timed_chain)
    return App(dispatch, double, fan_out, chain, timed_chain)


def profiled(main: Callable[[], T]) -> T:
    """Run `main`; with BENCH_E2E_PROFILE set, profile it between SIGUSR1 and SIGUSR2.

    SIGUSR1 starts cProfile (main thread) and SIGUSR2 stops it and writes the stats to
    the path the variable names, so that a profile covers the timed workload only.
    """
    path = os.environ.pop(PROFILE_ENV, "")
    if path:
        profile = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profile.enable())

        def stop(*_: object) -> None:
            profile.disable()
            profile.dump_stats(path + ".part")
            os.replace(path + ".part", path)  # complete once it appears

        signal.signal(signal.SIGUSR2, stop)
    return main()


def serve_app() -> None:
    """Serve the functions until SIGTERM."""
    profiled(build_app().dispatch.run)


def serve_embedded(key: str, long_chain: int, folder: str) -> None:
    """Run one workload on the embedded scheduler, driven as dispatch-py's peer is.

    Prints ``ready`` after a warm-up, runs the workload when a line arrives on standard
    input, prints ``result <json>``, and stays alive (for its CPU and memory to be read)
    until standard input closes.
    """
    workload = workloads(long_chain)[key]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        app = build_app(env={}, data_dir=folder, api_key=EMBEDDED_KEY)
        async with await app.dispatch.start() as server:
            assert server.api_url is not None
            from dispatch_aio.cli._inspect import InspectClient

            async with InspectClient(server.api_url, EMBEDDED_KEY) as inspect:
                await app.dispatch.client.result(await app.fan_out.dispatch(4), timeout=60)
                # As dispatch.run() does once started, in the sources that have it (with
                # --base-src, older sources may not, or have its earlier name).
                serving = dispatch_aio._serving
                tune = getattr(serving, "tune_garbage_collector", None) or getattr(
                    serving, "freeze_startup_objects", None
                )
                if tune is not None:
                    tune()
                print("ready", flush=True)
                await loop.run_in_executor(None, sys.stdin.readline)
                seconds, marks = await workload.run(app, inspect, workload.size)
                print("result " + json.dumps({"seconds": seconds, "marks": marks}), flush=True)
                await loop.run_in_executor(None, sys.stdin.read)

    profiled(lambda: asyncio.run(main()))


def serve_scheduler(argv: list[str]) -> None:
    """Run ``dispatch-aio ARGV`` in this process (to profile it)."""
    from dispatch_aio.cli import main

    sys.exit(profiled(lambda: main(argv)))


# -- processes ----------------------------------------------------------------------------


class Proc:
    """A child process in its own session; its output is drained by a thread.

    Lines ``export DISPATCH_...=...`` before the ready line are collected in `exports`;
    a line ``result <json>`` is parsed into `result`.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        ready_line: str = READY_LINE,
        stdin: bool = False,
        cwd: str | None = None,
    ) -> None:
        self.args = args
        self.ready_line = ready_line
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.exports: dict[str, str] = {}
        self.ready = threading.Event()
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:  # drained always: a full pipe would block the process
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("result "):
                self.result = json.loads(line[len("result ") :])
                self.done.set()
                continue
            self.tail.append(line)
            if self.ready.is_set():
                continue
            if match := re.fullmatch(r"export (DISPATCH_[A-Z_]+)=(.*)", line):
                self.exports[match[1]] = shlex.split(match[2])[0]
            elif self.ready_line in line:
                self.ready.set()
        self.done.set()  # EOF: the process is gone

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, event: threading.Event, what: str, timeout: float) -> None:
        """Wait for `event`; raise if the process exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not event.wait(0.05):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise self.failure(what)

    def failure(self, what: str) -> RuntimeError:
        output = "\n".join(self.tail)
        return RuntimeError(f"{what}: {' '.join(self.args)}\n--- last output ---\n{output}")

    def stop(self, timeout: float = 30.0) -> None:
        """Close stdin and SIGTERM (both end gracefully, writing profiles), then SIGKILL."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._reader.join(5)


@dataclass(frozen=True)
class Usage:
    """What /proc says of a process: peak RSS and CPU time (main thread and the rest)."""

    peak_rss_mb: float
    cpu_main: float
    cpu_other: float

    def minus(self, before: Usage) -> Usage:
        """CPU spent since `before` (the peak stays the peak since the process started)."""
        return Usage(
            self.peak_rss_mb, self.cpu_main - before.cpu_main, self.cpu_other - before.cpu_other
        )


def _cpu_seconds(stat_path: str) -> float:
    text = Path(stat_path).read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def usage(pid: int) -> Usage:
    """Peak RSS (VmHWM) and CPU seconds of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    peak = int(match[1]) / 1024 if match else float("nan")
    total = _cpu_seconds(f"/proc/{pid}/stat")  # includes threads that have exited
    main = _cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
    return Usage(peak, main, total - main)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """A scheduler and the application it calls, in a temporary folder."""

    server: Proc
    app: Proc
    folder: str
    profile: str | None = None

    @property
    def config(self) -> dict[str, str]:
        exports = self.server.exports
        return {
            "api_key": exports["DISPATCH_API_KEY"],
            "api_url": exports["DISPATCH_API_URL"],
            "endpoint_url": exports["DISPATCH_ENDPOINT_URL"],
        }

    def signal_profilers(self, sig: int) -> None:
        """Start (SIGUSR1) or stop (SIGUSR2) the profilers; wait for their stats when stopped."""
        if self.profile is None:
            return
        for proc in (self.server, self.app):
            proc.popen.send_signal(sig)
        if sig == signal.SIGUSR2:
            paths = [f"{self.profile}-{name}.prof" for name in ("scheduler", "app")]
            deadline = time.monotonic() + 30
            while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        try:
            self.app.stop()
        finally:
            self.server.stop()
            shutil.rmtree(self.folder, ignore_errors=True)


def start_stack(
    mode: str, data_root: str | None, profile: str | None = None, src: str | None = None
) -> Stack:
    """Start ``dispatch-aio server`` and the application; return once both accept requests.

    With `profile` (a path prefix), both processes write cProfile stats of what they
    do between SIGUSR1 and SIGUSR2 to ``{profile}-scheduler.prof`` and ``-app.prof``.
    With `src`, both import dispatch_aio from that folder.
    """
    folder = tempfile.mkdtemp(prefix="bench-e2e-", dir=data_root)
    port = free_port()
    env = child_env(src)
    command = [sys.executable, "-m", "dispatch_aio"]
    server_env = dict(env)
    if profile:  # the same command, run by this file so that it can be profiled
        command = [sys.executable, os.path.abspath(__file__), "--serve-scheduler"]
        server_env[PROFILE_ENV] = f"{profile}-scheduler.prof"
    args = [*command, "server", "--port", "0"]
    args += ["--data-dir", str(Path(folder) / "data"), "--endpoint", f"127.0.0.1:{port}"]
    if mode == "in-memory":
        args.append("--in-memory")
    server = Proc(args, server_env)
    try:
        server.wait_for(server.ready, "the scheduler did not print its ready line", 30)
        env.update(server.exports)  # with DISPATCH_VERIFICATION_KEY: every request verified
        if profile:
            env[PROFILE_ENV] = f"{profile}-app.prof"
        app = Proc([sys.executable, os.path.abspath(__file__), "--serve-app"], env)
    except BaseException:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    stack = Stack(server, app, folder, profile)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if app.popen.poll() is not None or time.monotonic() > deadline:
                raise app.failure("the application did not listen")
            time.sleep(0.02)
    except BaseException:
        stack.stop()
        raise
    return stack


# -- workloads on our side ----------------------------------------------------------------

Outcome = tuple[float, Marks | None]  # seconds, and the marks of a timed chain


async def run_w1(app: App, inspect: InspectClient, n: int) -> Outcome:
    start = time.perf_counter()
    dispatch_id = await app.fan_out.dispatch(n)
    result = await app.dispatch.client.result(dispatch_id, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if result != n * (n - 1):
        raise AssertionError(f"fan_out({n}) returned {result!r}, expected {n * (n - 1)}")
    return seconds, None


async def run_w2(app: App, inspect: InspectClient, n: int) -> Outcome:
    start = time.perf_counter()
    dispatch_id = await app.chain.dispatch(n)
    result = await app.dispatch.client.result(dispatch_id, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if result != n:
        raise AssertionError(f"chain({n}) returned {result!r}, expected {n}")
    return seconds, None


_UNFINISHED = inspect_pb2.ListCallsRequest(
    states=[
        inspect_pb2.CALL_STATE_PENDING,
        inspect_pb2.CALL_STATE_RUNNING,
        inspect_pb2.CALL_STATE_SUSPENDED,
    ],
    top_level_only=True,
    omit_payloads=True,
    limit=1,
)


async def _all_done(app: App, inspect: InspectClient, ids: list[str], start: float) -> float:
    """Wait until the calls `ids` to double(0..n-1) are done; return seconds since `start`."""
    # Waiting on the last call submitted costs the scheduler nothing while the calls
    # run; the few calls still unfinished then are polled for (one cheap query each).
    await app.dispatch.client.result(ids[-1], timeout=TIMEOUT)
    while (await inspect.list_calls(_UNFINISHED)).calls:
        if time.perf_counter() - start > TIMEOUT:
            raise AssertionError(f"{len(ids)} calls not done after {TIMEOUT} s")
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - start
    wanted = set(ids)
    calls = await inspect.iter_calls(inspect_pb2.ListCallsRequest(top_level_only=True))
    outputs = sorted(
        decode_value(c.result.output)  # type: ignore[type-var]
        for c in calls
        if c.dispatch_id in wanted
        and c.state == inspect_pb2.CALL_STATE_DONE
        and c.status == int(Status.OK)
    )
    if outputs != [2 * i for i in range(len(ids))]:
        raise AssertionError(f"{len(ids)} calls to double: {len(outputs)} came back right")
    return seconds


async def run_w3one(app: App, inspect: InspectClient, n: int) -> Outcome:
    start = time.perf_counter()
    ids = [await app.double.dispatch(i) for i in range(n)]  # one request per call
    return await _all_done(app, inspect, ids, start), None


async def run_w3batch(app: App, inspect: InspectClient, n: int) -> Outcome:
    batch = app.dispatch.batch()
    for i in range(n):
        batch.add(app.double, i)  # arguments are encoded here, before the clock starts
    start = time.perf_counter()
    ids = await batch.submit()
    return await _all_done(app, inspect, ids, start), None


async def run_w4(app: App, inspect: InspectClient, n: int) -> Outcome:
    start = time.perf_counter()
    dispatch_id = await app.timed_chain.dispatch(n, max(1, n // 10))
    marks = await app.dispatch.client.result(dispatch_id, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if not marks or marks[-1][0] != n - 1:
        raise AssertionError(f"timed_chain({n}) returned {marks!r}")
    return seconds, [(int(i), float(at)) for i, at in marks]


@dataclass(frozen=True)
class Workload:
    key: str  # as --workloads and the dispatch-py peer name it
    label: str
    size: int
    unit: str
    rate: bool  # the figure is size per second (else milliseconds per item)
    target: float | None  # the goal for the persistent ratio to dispatch-py
    run: Callable[[App, InspectClient, int], Awaitable[Outcome]]

    def figure(self, seconds: float) -> float:
        return self.size / seconds if self.rate else seconds / self.size * 1000

    def speedup(self, figure: float, baseline: float) -> float:
        """How many times faster `figure` is than `baseline` (above 1: faster)."""
        return figure / baseline if self.rate else baseline / figure

    def number(self, figure: float) -> str:
        return f"{figure:,.0f}" if self.rate else f"{figure:.2f}"


def workloads(long_chain: int) -> dict[str, Workload]:
    w = [
        Workload("w1", "W1 gather of 1000", 1000, "children/s", True, 1.5, run_w1),
        Workload("w2", "W2 chain of 200", 200, "ms/step", False, 1.0, run_w2),
        Workload("w3one", "W3 2000 calls one by one", 2000, "calls/s", True, 2.0, run_w3one),
        Workload("w3batch", "W3 2000 calls in one batch", 2000, "calls/s", True, 2.0, run_w3batch),
        Workload("w4", f"W4 chain of {long_chain:,}", long_chain, "ms/step", False, None, run_w4),
    ]
    return {x.key: x for x in w}


@dataclass(frozen=True)
class Sample:
    seconds: float
    figure: float
    marks: Marks | None
    usage: dict[str, Usage]  # by process: scheduler and app, or dispatch-py

    @property
    def peak_rss_mb(self) -> float:
        """The peaks of the system's processes, added (at most their peak together)."""
        return sum(u.peak_rss_mb for u in self.usage.values())

    def windows(self) -> list[float]:
        """Milliseconds per step between consecutive marks (tenths of the timed chain)."""
        assert self.marks is not None
        pairs = zip(self.marks, self.marks[1:], strict=False)
        return [(t1 - t0) / (i1 - i0) * 1000 for (i0, t0), (i1, t1) in pairs]

    @property
    def flatness(self) -> float:
        """Milliseconds per step of the last tenth over that of the first."""
        tenths = self.windows()
        return tenths[-1] / tenths[0]


async def drive(stack: Stack, workload: Workload) -> Sample:
    config = stack.config
    app = build_app(**config)
    from dispatch_aio.cli._inspect import InspectClient

    async with app.dispatch, InspectClient(config["api_url"], config["api_key"]) as inspect:
        # Warm-up, not timed: first connections, lazy imports, a first poll.
        await app.dispatch.client.result(await app.fan_out.dispatch(4), timeout=60)
        stack.signal_profilers(signal.SIGUSR1)
        before = usage(stack.server.pid), usage(stack.app.pid)
        seconds, marks = await workload.run(app, inspect, workload.size)
        after = usage(stack.server.pid), usage(stack.app.pid)
        stack.signal_profilers(signal.SIGUSR2)
    return Sample(
        seconds,
        workload.figure(seconds),
        marks,
        {"scheduler": after[0].minus(before[0]), "app": after[1].minus(before[1])},
    )


def child_env(src: str | None) -> dict[str, str]:
    """The environment of our processes: no DISPATCH_ settings; with `src`, its sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", PROFILE_ENV))}
    if src is not None:
        env["PYTHONPATH"] = src
    return env


def run_embedded(
    workload: Workload,
    long_chain: int,
    data_root: str | None,
    profile: str | None = None,
    src: str | None = None,
) -> Sample:
    """One run of `workload` in a fresh process with the embedded scheduler."""
    folder = tempfile.mkdtemp(prefix="bench-e2e-", dir=data_root)
    env = child_env(src)
    if profile:
        env[PROFILE_ENV] = profile
    args = [sys.executable, os.path.abspath(__file__), "--serve-embedded"]
    args += [workload.key, str(long_chain), str(Path(folder) / "data")]
    proc = Proc(args, env, ready_line="ready", stdin=True)
    try:
        proc.wait_for(proc.ready, "the embedded application did not get ready", 60)
        if profile:
            proc.popen.send_signal(signal.SIGUSR1)
        before = usage(proc.pid)
        assert proc.popen.stdin is not None
        proc.popen.stdin.write(b"go\n")
        proc.popen.stdin.flush()
        proc.wait_for(proc.done, "the embedded application did not finish", TIMEOUT)
        after = usage(proc.pid)
        if proc.result is None:
            raise proc.failure("the embedded application printed no result")
        if profile:
            proc.popen.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not os.path.exists(profile) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        proc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    seconds = float(proc.result["seconds"])
    raw = proc.result["marks"]
    marks = [(int(i), float(at)) for i, at in raw] if raw else None
    return Sample(seconds, workload.figure(seconds), marks, {"embedded": after.minus(before)})


def run_ours(
    workload: Workload,
    mode: str,
    data_root: str | None,
    profile: str | None = None,
    src: str | None = None,
) -> Sample:
    stack = start_stack(mode, data_root, profile, src)
    try:
        return asyncio.run(drive(stack, workload))
    except BaseException:
        sys.stderr.write(f"--- scheduler ---\n{chr(10).join(stack.server.tail)}\n")
        sys.stderr.write(f"--- application ---\n{chr(10).join(stack.app.tail)}\n")
        raise
    finally:
        stack.stop()


# -- dispatch-py ----------------------------------------------------------------------------


def default_venv_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dispatch-aio-bench"


# Imported where used, not at the top: the served application (this file) stays lean.
# For tests.interop.harness, which builds the virtualenv, and the test helpers it imports
# as pytest puts them on the path (tests/ports.py).
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def dispatch_py_python(root: Path) -> Path:
    """The python of the dispatch-py virtualenv under `root`, created on first use."""
    from tests.interop.harness import VenvError, ensure_venv

    started = time.monotonic()
    try:
        python, created = ensure_venv(root)
    except VenvError as exc:
        sys.exit(
            f"cannot set up the dispatch-py virtualenv under {root}: {exc}\n"
            "It is built once from the package registry pip is configured with; "
            "later runs reuse it."
        )
    if created:
        took = time.monotonic() - started
        print(f"dispatch-py virtualenv created in {took:.1f} s", file=sys.stderr, flush=True)
    return python


def run_dispatch_py(python: Path, workload: Workload, profile: str | None = None) -> Sample:
    """One run of `workload` in a fresh dispatch-py process (scheduler, app and client)."""
    from tests.interop.harness import peer_env

    args = [str(python), str(PEER), workload.key, str(workload.size)]
    if profile:
        args.append(profile)
    proc = Proc(args, peer_env(), ready_line="ready", stdin=True, cwd=str(PEER.parent))
    try:
        proc.wait_for(proc.ready, "dispatch-py did not get ready", 60)
        before = usage(proc.pid)
        assert proc.popen.stdin is not None
        proc.popen.stdin.write(b"go\n")
        proc.popen.stdin.flush()
        proc.wait_for(proc.done, "dispatch-py did not finish the workload", TIMEOUT)
        after = usage(proc.pid)
        if proc.result is None:
            raise proc.failure("dispatch-py printed no result")
    finally:
        proc.stop()
    seconds = float(proc.result["seconds"])
    raw = proc.result["marks"]
    marks = [(int(i), float(at)) for i, at in raw] if raw else None
    return Sample(seconds, workload.figure(seconds), marks, {"dispatch-py": after.minus(before)})


# -- report -------------------------------------------------------------------------------


def fsync_ms(folder: str | None, count: int = 20) -> float:
    """Median time of a 4 KiB write + fsync where the databases live (a disk baseline)."""
    fd, path = tempfile.mkstemp(prefix="bench-e2e-fsync-", dir=folder)
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(samples)


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def header(repeat: int, data_root: str | None, python: Path) -> list[str]:
    folder = data_root or tempfile.gettempdir()
    return [
        f"dispatch-aio vs dispatch-py 0.8.0, end to end: medians of {repeat} runs, interleaved; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
        f"databases in {folder}; fsync of a 4 KiB write there: {fsync_ms(data_root):.2f} ms "
        "(median of 20, measured now)",
        "dispatch-py: one process, its in-process test scheduler (dispatch.test: in memory, "
        f"unsigned); python {python}",
        "persistent: dispatch-aio server --data-dir (SQLite) + the application, every Run "
        "request signed and verified; in-memory: the same with --in-memory; embedded: the "
        "application alone, its scheduler in process on SQLite (one process).",
        "Ratios are ours over dispatch-py as speed-ups: above 1.00x we are faster. "
        "target: the goal for the persistent ratio.",
        "",
    ]


def _median(samples: list[Sample], key: Callable[[Sample], float]) -> float:
    return statistics.median(key(s) for s in samples)


def table(results: dict[tuple[str, str], list[Sample]], chosen: list[Workload]) -> list[str]:
    lines = [
        f"{'workload':<28} {'unit':<11} {'dispatch-py':>11} {'persistent':>10} {'ratio':>7} "
        f"{'target':>7}  {'in-memory':>9} {'ratio':>7}  {'embedded':>9} {'ratio':>7}"
    ]
    for w in chosen:
        base = _median(results[w.key, "dispatch-py"], lambda s: s.figure)
        p = _median(results[w.key, "persistent"], lambda s: s.figure)
        m = _median(results[w.key, "in-memory"], lambda s: s.figure)
        e = _median(results[w.key, "embedded"], lambda s: s.figure)
        ratio = w.speedup(p, base)
        target = (
            "" if w.target is None else f"{w.target:.1f}x {'ok' if ratio >= w.target else 'no'}"
        )
        lines.append(
            f"{w.label:<28} {w.unit:<11} {w.number(base):>11} {w.number(p):>10} {ratio:>6.2f}x "
            f"{target:>7}  {w.number(m):>9} {w.speedup(m, base):>6.2f}x  "
            f"{w.number(e):>9} {w.speedup(e, base):>6.2f}x"
        )
        if w.key == "w4":
            f = {s: _median(results[w.key, s], lambda x: x.flatness) for s in SYSTEMS}
            flat = "1.3 " + ("ok" if f["persistent"] <= 1.3 else "no")  # the bound
            lines.append(
                f"{'  flatness (last/first tenth)':<28} {'ratio':<11} {f['dispatch-py']:>11.2f} "
                f"{f['persistent']:>10.2f} {'':>7} {flat:>7}  {f['in-memory']:>9.2f} "
                f"{'':>7}  {f['embedded']:>9.2f}"
            )
    rss = {  # the highest of the workloads' medians
        s: max(_median(results[w.key, s], lambda x: x.peak_rss_mb) for w in chosen) for s in SYSTEMS
    }
    lines.append(
        f"{'peak RSS, all processes':<28} {'MB':<11} {rss['dispatch-py']:>11.1f} "
        f"{rss['persistent']:>10.1f} {rss['dispatch-py'] / rss['persistent']:>6.2f}x "
        f"{'1.0x ' + ('ok' if rss['persistent'] <= rss['dispatch-py'] else 'no'):>7}  "
        f"{rss['in-memory']:>9.1f} {rss['dispatch-py'] / rss['in-memory']:>6.2f}x  "
        f"{rss['embedded']:>9.1f} {rss['dispatch-py'] / rss['embedded']:>6.2f}x"
    )
    lines += [
        "",
        "Per run: the range of the figure; medians of the wall time, of the CPU seconds each "
        "process spent during the workload (main thread + other threads) and of its peak RSS "
        "(VmHWM at the end of the run; 'all' adds the peaks).",
        f"{'workload':<8} {'system':<15} {'min..max':>15} {'wall s':>7} "
        f"{'CPU s: scheduler':>17} {'app':>11} {'peak MB: sched':>15} {'app':>6} {'all':>6}",
    ]
    ran = [s for s in (*SYSTEMS, *BASE_SYSTEMS) if any((w.key, s) in results for w in chosen)]
    for w in chosen:
        for system in ran:
            runs = results[w.key, system]
            figures = [s.figure for s in runs]
            spread = f"{w.number(min(figures))}..{w.number(max(figures))}"
            names = [system] if system in ("dispatch-py", "embedded") else ["scheduler", "app"]
            names = ["embedded"] if system == "embedded-base" else names
            cpu = [_cpu([s.usage[n] for s in runs]) for n in names]
            peak = [f"{statistics.median(s.usage[n].peak_rss_mb for s in runs):.1f}" for n in names]
            if len(names) == 1:  # one process: scheduler, app and client
                cpu, peak = [cpu[0], "(same)"], [peak[0], "(same)"]
            lines.append(
                f"{w.key:<8} {system:<15} {spread:>15} {_median(runs, lambda s: s.seconds):>7.2f} "
                f"{cpu[0]:>17} {cpu[1]:>11} {peak[0]:>15} {peak[1]:>6} "
                f"{_median(runs, lambda s: s.peak_rss_mb):>6.1f}"
            )
    if any(w.key == "w4" for w in chosen):
        lines += ["", "W4 ms/step by tenth of the chain (medians over the runs):"]
        for system in ran:
            tenths = [s.windows() for s in results["w4", system]]
            cells = " ".join(f"{statistics.median(col):6.2f}" for col in zip(*tenths, strict=True))
            lines.append(f"  {system:<11} {cells}")
    if any((w.key, b) in results for w in chosen for b in BASE_SYSTEMS):
        lines += ["", *base_table(results, chosen)]
    return lines


def base_table(results: dict[tuple[str, str], list[Sample]], chosen: list[Workload]) -> list[str]:
    """This tree against the --base-src sources, measured in the same rounds.

    Besides the ratio of the medians, the ratios of the runs of each round, taken in
    pairs (their median, and in how many rounds this tree was the faster): two runs of
    one round share the machine's load of the moment, which the medians of the runs
    taken apart do not cancel.
    """
    lines = [
        "This tree against the --base-src sources (same rounds; above 1.00x this tree is "
        "faster, or for memory smaller; paired: the median of the rounds' ratios, and the "
        "rounds this tree won):",
        f"{'workload':<28} {'unit':<11} {'persistent':>10} {'base':>9} {'ratio':>7} "
        f"{'paired':>12}  {'embedded':>9} {'base':>9} {'ratio':>7} {'paired':>12}",
    ]

    def paired(w: Workload, system: str) -> str:
        pairs = zip(results[w.key, system], results[w.key, f"{system}-base"], strict=True)
        ratios = [w.speedup(ours.figure, base.figure) for ours, base in pairs]
        won = sum(r > 1 for r in ratios)
        return f"{statistics.median(ratios):.2f}x {won}/{len(ratios)}"

    for w in chosen:
        f = {s: _median(results[w.key, s], lambda x: x.figure) for s in (*OURS, *BASE_SYSTEMS)}
        lines.append(
            f"{w.label:<28} {w.unit:<11} {w.number(f['persistent']):>10} "
            f"{w.number(f['persistent-base']):>9} "
            f"{w.speedup(f['persistent'], f['persistent-base']):>6.2f}x "
            f"{paired(w, 'persistent'):>12}  "
            f"{w.number(f['embedded']):>9} {w.number(f['embedded-base']):>9} "
            f"{w.speedup(f['embedded'], f['embedded-base']):>6.2f}x {paired(w, 'embedded'):>12}"
        )
    rss = {
        s: max(_median(results[w.key, s], lambda x: x.peak_rss_mb) for w in chosen)
        for s in (*OURS, *BASE_SYSTEMS)
    }
    lines.append(
        f"{'peak RSS, all processes':<28} {'MB':<11} {rss['persistent']:>10.1f} "
        f"{rss['persistent-base']:>9.1f} {rss['persistent-base'] / rss['persistent']:>6.2f}x "
        f"{'':>12}  {rss['embedded']:>9.1f} {rss['embedded-base']:>9.1f} "
        f"{rss['embedded-base'] / rss['embedded']:>6.2f}x"
    )
    return lines


def floor_table(
    results: dict[tuple[str, str], list[Sample]],
    chosen: list[Workload],
    samples: list[floor.Components],
) -> list[str]:
    """The floor of each workload, from components measured in the same rounds."""
    import floor

    components = floor.median(samples)
    lines = [
        "",
        "Floors: the best figure each workload could reach if our code cost nothing beyond "
        "these components, measured in each round with no dispatch-aio code (bench/floor.py; "
        f"medians): {floor.describe(components)}.",
        "A target above the best ratio is out of reach with these components on this machine.",
        f"{'workload':<28} {'system':<11} {'floor':>9} {'unit':<11} {'best ratio':>10} "
        f"{'measured':>9} {'target':>7} {'':<12}  formula",
    ]
    by_key = {w.key: w for w in chosen}
    for f in floor.floors(components):
        w = by_key.get(f.workload)
        if w is None:
            continue
        base = _median(results[w.key, "dispatch-py"], lambda s: s.figure)
        ours = _median(results[w.key, f.system], lambda s: s.figure)
        best = w.speedup(f.figure, base)
        target = "" if w.target is None else f"{w.target:.1f}x"
        reach = "" if w.target is None else "out of reach" if best < w.target else "in reach"
        lines.append(
            f"{w.label:<28} {f.system:<11} {w.number(f.figure):>9} {w.unit:<11} {best:>9.2f}x "
            f"{w.speedup(ours, base):>8.2f}x {target:>7} {reach:<12}  {f.formula}"
        )
    rss = {  # as in the table: the highest of the workloads' medians
        s: max(_median(results[w.key, s], lambda x: x.peak_rss_mb) for w in chosen)
        for s in ("dispatch-py", "persistent", "embedded")
    }
    for system, least, formula in floor.rss_floors(components):
        best = rss["dispatch-py"] / least
        lines.append(
            f"{'peak RSS, all processes':<28} {system:<11} {least:>9.1f} {'MB':<11} "
            f"{best:>9.2f}x {rss['dispatch-py'] / rss[system]:>8.2f}x {'1.0x':>7} "
            f"{'out of reach' if best < 1.0 else 'in reach':<12}  {formula}"
        )
    return lines


def _cpu(usages: list[Usage]) -> str:
    main = statistics.median(u.cpu_main for u in usages)
    other = statistics.median(u.cpu_other for u in usages)
    return f"{main:.2f} + {other:.2f}"


def print_profile(path: str, title: str, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out).strip_dirs()
    for order in ("tottime", "cumulative"):
        out.write(f"=== {title}: top {top} by {order} ===\n")
        stats.sort_stats(order).print_stats(top)
    # Keep the tables, not pstats' preamble (date, path, totals, ordering).
    preamble = re.compile(r"^(\w{3} \w{3} |\s*$|\s+(Ordered by|List reduced)|.*function calls)")
    print("\n".join(line for line in out.getvalue().splitlines() if not preamble.match(line)))


def profile(
    chosen: list[Workload], folder: str, data_root: str | None, top: int, python: Path
) -> None:
    os.makedirs(folder, exist_ok=True)
    for w in chosen:
        prefix = os.path.join(os.path.abspath(folder), w.key)
        for name in ("scheduler", "app", "dispatch-py", "embedded"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{prefix}-{name}.prof")
        ours = run_ours(w, "persistent", data_root, profile=prefix)
        theirs = run_dispatch_py(python, w, profile=f"{prefix}-dispatch-py.prof")
        alone = run_embedded(w, w.size, data_root, profile=f"{prefix}-embedded.prof")
        sched, app = ours.usage["scheduler"], ours.usage["app"]
        print(
            f"##### {w.label} under cProfile: persistent {w.number(ours.figure)} {w.unit} "
            f"({ours.seconds:.2f} s; CPU s: scheduler {sched.cpu_main:.2f} + "
            f"{sched.cpu_other:.2f}, app {app.cpu_main:.2f} + {app.cpu_other:.2f}); "
            f"dispatch-py {w.number(theirs.figure)} {w.unit} ({theirs.seconds:.2f} s); "
            f"embedded {w.number(alone.figure)} {w.unit} ({alone.seconds:.2f} s)"
        )
        print_profile(f"{prefix}-scheduler.prof", f"{w.key} scheduler (main thread)", top)
        print_profile(f"{prefix}-app.prof", f"{w.key} application", top)
        print_profile(f"{prefix}-dispatch-py.prof", f"{w.key} dispatch-py (one process)", top)
        print_profile(f"{prefix}-embedded.prof", f"{w.key} embedded (one process)", top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and system")
    parser.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help="comma-separated among w1,w2,w3one,w3batch,w4, or all (default: %(default)s)",
    )
    parser.add_argument(
        "--long-chain", type=int, default=10_000, metavar="N", help="steps of W4 (default 10000)"
    )
    parser.add_argument("--data-root", help="folder of the temporary data folders")
    parser.add_argument(
        "--venv-root",
        type=Path,
        default=default_venv_root(),
        help="folder of the cached dispatch-py virtualenv (default: %(default)s)",
    )
    parser.add_argument("--profile", metavar="DIR", help="write and show cProfile stats instead")
    parser.add_argument(
        "--base-src",
        metavar="DIR",
        help="also run persistent and embedded with dispatch_aio from DIR (a checkout's src)",
    )
    parser.add_argument("--top", type=int, default=25, help="rows per profile table")
    parser.add_argument("--serve-app", action="store_true", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--serve-scheduler"]:
        serve_scheduler(sys.argv[2:])
    if sys.argv[1:2] == ["--serve-embedded"]:
        key, long_chain, folder = sys.argv[2:5]
        serve_embedded(key, int(long_chain), folder)
        return
    args = parser.parse_args()
    if args.serve_app:
        serve_app()
        return
    if args.long_chain < 20:
        parser.error("--long-chain must be at least 20")
    table_of = workloads(args.long_chain)
    spec = ",".join(table_of) if args.workloads.strip() == "all" else args.workloads
    keys = [k.strip().lower() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table_of]
    if unknown or not keys:
        parser.error(f"unknown workloads {unknown}: choose among {', '.join(table_of)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    base_src = None
    if args.base_src:
        base_src = os.path.abspath(args.base_src)
        if not os.path.isfile(os.path.join(base_src, "dispatch_aio", "__init__.py")):
            parser.error(f"--base-src {args.base_src}: no dispatch_aio package in that folder")
    chosen = [table_of[k] for k in keys]
    python = dispatch_py_python(args.venv_root)
    if args.profile:
        profile(chosen, args.profile, args.data_root, args.top, python)
        return
    lines = header(args.repeat, args.data_root, python)
    load_start = loadavg()
    results: dict[tuple[str, str], list[Sample]] = collections.defaultdict(list)
    import floor

    floors: list[floor.Components] = []  # one measurement per round
    # Interleaved, the order of the systems rotating, so that a change of the machine's
    # load hits them alike.
    systems = (*SYSTEMS, *BASE_SYSTEMS) if base_src else SYSTEMS
    for run in range(args.repeat):
        order = systems[run % len(systems) :] + systems[: run % len(systems)]
        for w in chosen:
            for system in order:
                src = base_src if system.endswith("-base") else None
                if system == "dispatch-py":
                    sample = run_dispatch_py(python, w)
                elif system.startswith("embedded"):
                    sample = run_embedded(w, args.long_chain, args.data_root, src=src)
                else:
                    sample = run_ours(w, system.removesuffix("-base"), args.data_root, src=src)
                results[w.key, system].append(sample)
                extra = f", flatness {sample.flatness:.2f}" if sample.marks else ""
                print(
                    f"run {run + 1}/{args.repeat} {w.key:<7} {system:<15} "
                    f"{w.number(sample.figure):>7} {w.unit} ({sample.seconds:.2f} s{extra}), "
                    f"peak {sample.peak_rss_mb:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
        floors.append(floor.measure(args.data_root))
    lines.insert(1, f"load average (1, 5, 15 min): {load_start} at start, {loadavg()} at end")
    print("\n".join([*lines, *table(results, chosen), *floor_table(results, chosen, floors)]))


if __name__ == "__main__":
    main()
