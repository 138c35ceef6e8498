"""End to end: ``dispatch-aio server`` and an application on this SDK, as separate processes.

Three workloads, each run `--repeat` times (medians printed), each run on a fresh
scheduler and a fresh application (so that peak memory is per run):

- W1: one call gathers 1000 children (``asyncio.gather`` of durable calls): children/s,
  from the submission of the call to its result.
- W2: one call makes 200 sequential calls: milliseconds per step, same timing.
- W3: 2000 independent top-level calls submitted in one ``dispatch.batch()``: calls/s,
  from the submission to the last call done.

As in real use, the scheduler is ``dispatch-aio server --data-dir`` (a SQLite file in a
temporary folder) and signs every Run request, and the application serves with
``dispatch.run()`` and ``DISPATCH_VERIFICATION_KEY`` set, so it verifies every request.
The baseline measured in the same run is the same thing with ``--in-memory``: the ratio
shows the cost of persistence. Next to each figure is also its ratio to the numbers the
issue quotes for dispatch-py 0.8.0 and its in-memory test scheduler (no persistence, no
signatures); those are constants, not measured here. Goals are checked on the
persistent figures. A run starts with a short warm-up call that is not timed. Progress
lines go to standard error, the table to standard output.

    python bench/bench_e2e.py [--repeat 3] [--workloads w1,w2,w3] [--data-root DIR]
    python bench/bench_e2e.py --profile DIR   # cProfile both processes, one run of each
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import io
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
from typing import Any, TypeVar

from dispatch_aio import Dispatch, Function, Status
from dispatch_aio._cli_inspect import InspectClient
from dispatch_aio._codec import decode_value
from dispatch_aio.proto.v1 import inspect_pb2

READY_LINE = "Ready. Press Ctrl+C to stop."
PROFILE_ENV = "BENCH_E2E_PROFILE"  # where a profiled process writes its cProfile stats
TIMEOUT = 600.0  # a stalled workload fails the benchmark rather than hanging it
MODES = ("persistent", "in-memory")
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


# -- the application ----------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """The benchmark's functions, registered on one `Dispatch` object."""

    dispatch: Dispatch
    double: Function[[int], int]
    fan_out: Function[[int], int]
    chain: Function[[int], int]


def build_app(**config: Any) -> App:
    """Register the functions; the application serves them, the driver submits calls."""
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
    return App(dispatch, double, fan_out, chain)


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


def serve_scheduler(argv: list[str]) -> None:
    """Run ``dispatch-aio ARGV`` in this process (to profile it)."""
    from dispatch_aio.cli import main

    sys.exit(profiled(lambda: main(argv)))


# -- processes ----------------------------------------------------------------------------


class Proc:
    """A child process in its own session; its output is drained by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.exports: dict[str, str] = {}
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:  # drained always: a full pipe would block the process
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            if self.ready.is_set():
                continue
            if match := re.fullmatch(r"export (DISPATCH_[A-Z_]+)=(.*)", line):
                self.exports[match[1]] = shlex.split(match[2])[0]
            elif READY_LINE in line:
                self.ready.set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def failure(self, what: str) -> RuntimeError:
        output = "\n".join(self.tail)
        return RuntimeError(f"{what}: {' '.join(self.args)}\n--- last output ---\n{output}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (both processes stop gracefully, writing their profiles), then SIGKILL."""
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


def start_stack(mode: str, data_root: str | None, profile: str | None = None) -> Stack:
    """Start ``dispatch-aio server`` and the application; return once both accept requests.

    With `profile` (a path prefix), both processes write cProfile stats of what they
    do between SIGUSR1 and SIGUSR2 to ``{profile}-scheduler.prof`` and ``-app.prof``.
    """
    folder = tempfile.mkdtemp(prefix="bench-e2e-", dir=data_root)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", PROFILE_ENV))}
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
        deadline = time.monotonic() + 30
        while not server.ready.wait(0.05):
            if server.popen.poll() is not None or time.monotonic() > deadline:
                raise server.failure("the scheduler did not print its ready line")
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


# -- workloads ----------------------------------------------------------------------------


async def run_w1(app: App, inspect: InspectClient, n: int) -> float:
    start = time.perf_counter()
    dispatch_id = await app.fan_out.dispatch(n)
    result = await app.dispatch.client.result(dispatch_id, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if result != n * (n - 1):
        raise AssertionError(f"fan_out({n}) returned {result!r}, expected {n * (n - 1)}")
    return seconds


async def run_w2(app: App, inspect: InspectClient, n: int) -> float:
    start = time.perf_counter()
    dispatch_id = await app.chain.dispatch(n)
    result = await app.dispatch.client.result(dispatch_id, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if result != n:
        raise AssertionError(f"chain({n}) returned {result!r}, expected {n}")
    return seconds


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


async def run_w3(app: App, inspect: InspectClient, n: int) -> float:
    batch = app.dispatch.batch()
    for i in range(n):
        batch.add(app.double, i)  # arguments are encoded here, before the clock starts
    start = time.perf_counter()
    ids = await batch.submit()
    # Waiting on the last call submitted costs the scheduler nothing while the calls
    # run; the few calls still unfinished then are polled for (one cheap query each).
    await app.dispatch.client.result(ids[-1], timeout=TIMEOUT)
    while (await inspect.list_calls(_UNFINISHED)).calls:
        if time.perf_counter() - start > TIMEOUT:
            raise AssertionError(f"{n} calls not done after {TIMEOUT} s")
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
    if outputs != [2 * i for i in range(n)]:
        raise AssertionError(f"{n} calls to double: {len(outputs)} came back right")
    return seconds


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    size: int
    unit: str
    rate: bool  # the figure is size per second (else milliseconds per item)
    reference: float  # dispatch-py 0.8.0, quoted from the issue
    goal: float
    stretch: float | None
    run: Callable[[App, InspectClient, int], Awaitable[float]]

    def figure(self, seconds: float) -> float:
        return self.size / seconds if self.rate else seconds / self.size * 1000

    def speedup(self, figure: float, baseline: float) -> float:
        """How many times faster `figure` is than `baseline` (above 1: faster)."""
        return figure / baseline if self.rate else baseline / figure

    def meets(self, figure: float, goal: float) -> bool:
        return figure >= goal if self.rate else figure < goal


WORKLOADS = {
    "w1": Workload(
        "W1", "gather of 1000 children", 1000, "children/s", True, 900.0, 1800.0, None, run_w1
    ),
    "w2": Workload("W2", "chain of 200 calls", 200, "ms/step", False, 2.3, 2.3, 1.0, run_w2),
    "w3": Workload(
        "W3", "2000 calls in one batch", 2000, "calls/s", True, 1160.0, 1200.0, None, run_w3
    ),
}


@dataclass(frozen=True)
class Sample:
    seconds: float
    figure: float
    scheduler: Usage
    app: Usage


async def drive(stack: Stack, workload: Workload) -> Sample:
    config = stack.config
    app = build_app(**config)
    async with app.dispatch, InspectClient(config["api_url"], config["api_key"]) as inspect:
        # Warm-up, not timed: first connections, lazy imports, a first poll.
        await app.dispatch.client.result(await app.fan_out.dispatch(4), timeout=60)
        stack.signal_profilers(signal.SIGUSR1)
        before = usage(stack.server.pid), usage(stack.app.pid)
        seconds = await workload.run(app, inspect, workload.size)
        after = usage(stack.server.pid), usage(stack.app.pid)
        stack.signal_profilers(signal.SIGUSR2)
    return Sample(
        seconds, workload.figure(seconds), after[0].minus(before[0]), after[1].minus(before[1])
    )


def run_once(
    workload: Workload, mode: str, data_root: str | None, profile: str | None = None
) -> Sample:
    stack = start_stack(mode, data_root, profile)
    try:
        return asyncio.run(drive(stack, workload))
    except BaseException:
        sys.stderr.write(f"--- scheduler ---\n{chr(10).join(stack.server.tail)}\n")
        sys.stderr.write(f"--- application ---\n{chr(10).join(stack.app.tail)}\n")
        raise
    finally:
        stack.stop()


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


def number(workload: Workload, figure: float) -> str:
    return f"{figure:,.0f}" if workload.rate else f"{figure:.2f}"


def verdict(workload: Workload, figure: float) -> str:
    op = ">=" if workload.rate else "<"
    met = workload.meets(figure, workload.goal)
    text = f"{op} {number(workload, workload.goal)} {'PASS' if met else 'MISS'}"
    if workload.stretch is not None:
        met = workload.meets(figure, workload.stretch)
        text += f", stretch {op} {workload.stretch:g} {'PASS' if met else 'MISS'}"
    return text


def header(repeat: int, data_root: str | None) -> list[str]:
    folder = data_root or tempfile.gettempdir()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"dispatch-aio end to end: medians of {repeat} runs; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {load} at start",
        f"databases in {folder}; fsync of a 4 KiB write there: {fsync_ms(data_root):.2f} ms "
        "(median of 20, measured now)",
        "persistent: dispatch-aio server --data-dir (SQLite file); in-memory: --in-memory "
        "(the baseline measured in this run).",
        "Both: the scheduler signs every Run request, the application verifies every signature.",
        "ref: dispatch-py 0.8.0 with its in-memory test scheduler (no persistence, no signatures), "
        "numbers quoted from the issue: reference, not measured here.",
        "Ratios are speed-ups: above 1.00x is faster than what the column compares with. "
        "Goals are checked on the persistent figures.",
        "",
    ]


def table(results: dict[tuple[str, str], list[Sample]], keys: list[str]) -> list[str]:
    lines = [
        f"{'workload':<29} {'unit':<11} {'persistent':>10} {'vs ref':>7} {'vs in-mem':>9}  "
        f"{'goal':<36} {'in-memory':>9} {'vs ref':>7}"
    ]
    for key in keys:
        w = WORKLOADS[key]
        p = statistics.median(s.figure for s in results[key, "persistent"])
        m = statistics.median(s.figure for s in results[key, "in-memory"])
        lines.append(
            f"{w.key + ' ' + w.title:<29} {w.unit:<11} {number(w, p):>10} "
            f"{w.speedup(p, w.reference):>6.2f}x {w.speedup(p, m):>8.2f}x  {verdict(w, p):<36} "
            f"{number(w, m):>9} {w.speedup(m, w.reference):>6.2f}x"
        )
    refs = ", ".join(f"{w.key} {number(w, w.reference)} {w.unit}" for w in WORKLOADS.values())
    lines += [f"(ref, not measured here: {refs})", ""]
    lines.append(
        "Per run: the range of the figure over the runs; then medians of the wall time of "
        "the workload, the CPU seconds each process spent meanwhile (main thread + other "
        "threads) and the peak RSS (VmHWM) of each process at the end of the run."
    )
    lines.append(
        f"{'workload':<9} {'mode':<11} {'min..max':>17} {'wall s':>7} {'scheduler CPU s':>16} "
        f"{'app CPU s':>12} {'scheduler peak':>15} {'app peak':>9}"
    )
    for key in keys:
        w = WORKLOADS[key]
        for mode in MODES:
            runs = results[key, mode]
            figures = [s.figure for s in runs]
            spread = f"{number(w, min(figures))}..{number(w, max(figures))}"
            sched = [s.scheduler for s in runs]
            app = [s.app for s in runs]
            lines.append(
                f"{w.key:<9} {mode:<11} {spread:>17} "
                f"{statistics.median(s.seconds for s in runs):>7.2f} "
                f"{_cpu(sched):>16} {_cpu(app):>12} {_peak(sched):>15} {_peak(app):>9}"
            )
    return lines


def _cpu(usages: list[Usage]) -> str:
    main = statistics.median(u.cpu_main for u in usages)
    other = statistics.median(u.cpu_other for u in usages)
    return f"{main:.2f} + {other:.2f}"


def _peak(usages: list[Usage]) -> str:
    return f"{statistics.median(u.peak_rss_mb for u in usages):.1f} MB"


def print_profile(path: str, title: str, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out).strip_dirs()
    for order in ("tottime", "cumulative"):
        out.write(f"=== {title}: top {top} by {order} ===\n")
        stats.sort_stats(order).print_stats(top)
    # Drop pstats' preamble lines, keep the tables.
    print("\n".join(line for line in out.getvalue().splitlines() if "function calls" not in line))


def profile(keys: list[str], folder: str, data_root: str | None, top: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for key in keys:
        w = WORKLOADS[key]
        prefix = os.path.join(os.path.abspath(folder), key)
        for name in ("scheduler", "app"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{prefix}-{name}.prof")
        sample = run_once(w, "persistent", data_root, profile=prefix)
        print(
            f"##### {w.key} {w.title}, persistent, under cProfile: {number(w, sample.figure)} "
            f"{w.unit} ({sample.seconds:.2f} s); scheduler CPU {sample.scheduler.cpu_main:.2f} + "
            f"{sample.scheduler.cpu_other:.2f} s, app CPU {sample.app.cpu_main:.2f} + "
            f"{sample.app.cpu_other:.2f} s"
        )
        print_profile(f"{prefix}-scheduler.prof", f"{w.key} scheduler (main thread)", top)
        print_profile(f"{prefix}-app.prof", f"{w.key} application", top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and mode")
    parser.add_argument("--workloads", default="w1,w2,w3", help="comma-separated: w1,w2,w3")
    parser.add_argument("--data-root", help="folder of the temporary data folders")
    parser.add_argument("--profile", metavar="DIR", help="write and show cProfile stats instead")
    parser.add_argument("--top", type=int, default=25, help="rows per profile table")
    parser.add_argument("--serve-app", action="store_true", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--serve-scheduler"]:
        serve_scheduler(sys.argv[2:])
    args = parser.parse_args()
    if args.serve_app:
        serve_app()
        return
    keys = [k.strip().lower() for k in args.workloads.split(",") if k.strip()]
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown or not keys:
        parser.error(f"unknown workloads {unknown}: choose among {', '.join(WORKLOADS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.profile:
        profile(keys, args.profile, args.data_root, args.top)
        return
    lines = header(args.repeat, args.data_root)
    results: dict[tuple[str, str], list[Sample]] = collections.defaultdict(list)
    # Interleaved, so that a change of the machine's load hits both modes alike.
    for run in range(args.repeat):
        for key in keys:
            for mode in MODES:
                w = WORKLOADS[key]
                sample = run_once(w, mode, args.data_root)
                results[key, mode].append(sample)
                print(
                    f"run {run + 1}/{args.repeat} {w.key} {mode:<10} "
                    f"{number(w, sample.figure):>7} {w.unit} ({sample.seconds:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    print("\n".join([*lines, *table(results, keys)]))


if __name__ == "__main__":
    main()
