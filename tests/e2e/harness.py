"""Real processes for end-to-end tests: the dispatch-aio command and applications.

Every process is started in a session of its own and killed (with its group) when the
test ends, whatever happened. Output is collected by threads, so a test can wait for a
line while the process runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_LINE = "Ready. Press Ctrl+C to stop."
PYTHON = sys.executable
CLI = [PYTHON, "-m", "dispatch_aio"]


def wait_for_port(port: int, timeout: float = 15.0, proc: Proc | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"{proc} exited with {proc.poll()} before listening\n{proc.dump()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Let a process started meanwhile take SIGINT as a terminal would start it.

    An ignored SIGINT is inherited: a suite run in the background (``pytest &``) has
    one, and its processes would not stop on the SIGINT the tests send them.
    """
    ignored = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    )
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class Proc:
    """A child process whose output is collected line by line."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stdout: int | None = None,
    ) -> None:
        self.args = list(args)
        with _sigint_not_ignored():
            self.popen = subprocess.Popen(
                self.args,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout is None else stdout,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._threads = []
        for stream, lines in ((self.popen.stdout, self.out), (self.popen.stderr, self.err)):
            if stream is not None:
                thread = threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                thread.start()
                self._threads.append(thread)

    def __repr__(self) -> str:
        return f"<Proc {self.popen.pid} {' '.join(self.args)[:80]}>"

    def _read(self, stream: object, lines: list[str]) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait_for(
        self, predicate: Callable[[str], bool] | str, timeout: float = 15.0, *, err: bool = False
    ) -> str:
        """Wait for an output line matching `predicate` (a regex when a str)."""
        if isinstance(predicate, str):
            pattern = re.compile(predicate)
            predicate = lambda line: pattern.search(line) is not None  # noqa: E731
        lines = self.err if err else self.out
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and self._done()):
                    raise AssertionError(f"no matching line from {self}\n{self.dump()}")
                self._changed.wait(min(left, 0.1))

    def _done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and its output to be read; return its status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} still runs after {timeout} s\n{self.dump()}") from None
        for thread in self._threads:
            thread.join(5)
        return code

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """Kill the process and its group (SIGKILL), and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        for thread in self._threads:
            thread.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.err)

    def dump(self) -> str:
        return f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


Starter = Callable[..., Proc]


@contextlib.contextmanager
def started_procs() -> Iterator[Starter]:
    """Start processes that are all killed when the block ends, however it ends."""
    started: list[Proc] = []

    def start(args: Sequence[str], **kwargs: object) -> Proc:
        proc = Proc(args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


@pytest.fixture
def procs() -> Iterator[Starter]:
    """Start processes that are killed when the test ends."""
    with started_procs() as start:
        yield start


@dataclass
class Server:
    """A running ``dispatch-aio server`` and the variables it printed."""

    proc: Proc
    exports: dict[str, str]

    @property
    def api_url(self) -> str:
        return self.exports["DISPATCH_API_URL"]

    @property
    def api_key(self) -> str:
        return self.exports["DISPATCH_API_KEY"]

    def app_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.exports)
        env.update(extra)
        return env


def start_server(start: Starter, *args: str, cwd: str | Path | None = None) -> Server:
    """Start ``dispatch-aio server`` with `args`; return once it printed its ready line."""
    proc = start([*CLI, "server", *args], cwd=cwd)
    proc.wait_for(re.escape(READY_LINE))
    exports = {}
    for line in proc.out:
        if match := re.fullmatch(r"export (DISPATCH_[A-Z_]+)=(\S+)", line):
            exports[match[1]] = match[2]
    return Server(proc, exports)
