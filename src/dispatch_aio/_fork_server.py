"""Processes forked from an interpreter that has imported the SDK and nothing else.

Starting a Python interpreter and importing the SDK with its dependencies costs a few
tenths of a second of CPU; forking a process that has already done it costs about a
millisecond. `ForkServer` starts such a process (the server: it imports the SDK and
any modules named to preload, starts no thread and runs no code of the program) and
asks it for workers. Each worker is a new process with the server's imports and
nothing of the parent: it loads the program's modules itself, as a new interpreter
would, so its classes and functions are new objects.

What a worker shares with its server, and a new interpreter would not: the hash seed
of ``str`` and ``bytes`` (so `WorkerPool` alternates between two servers, each with
its own seed, and consecutive requests see different seeds), and the state of the
preloaded modules, which have run nothing. ``random``'s global generator is seeded
again in each worker (``random`` does so after any fork). The parent's environment
variables and working directory at the time of the request are applied to the worker
before it runs anything.

Protocol on the control socket (a socketpair; the server's end is passed as an open
descriptor): the parent sends one byte with four descriptors attached (the worker's
stdin, stdout and stderr, and a pipe on which the server writes the worker's exit
status once it has reaped it), then a 4-byte big-endian length and a JSON object (the
environment and the working directory); the server forks and answers with the
worker's pid as 4 bytes. The server exits when the parent closes its end.

Linux only: elsewhere forking a process that has loaded system frameworks is unsafe
(macOS), or impossible (Windows), and `WorkerPool` starts new interpreters.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO

__all__ = ["ForkServer", "ForkedProcess", "available", "serve"]

_INT = struct.Struct(">i")
_BOOT = (
    "import sys; from dispatch_aio._fork_server import serve; serve(int(sys.argv[1]), sys.argv[2:])"
)


def available() -> bool:
    """Whether workers can be forked from a server on this platform."""
    return sys.platform == "linux" and hasattr(socket, "send_fds")


class ForkedProcess:
    """A worker forked by a `ForkServer`: the parts of `subprocess.Popen` a pool uses.

    Not the parent's child: its exit status comes from the server, which reaps it.
    """

    def __init__(self, pid: int, stdin: IO[bytes], stdout: int, stderr: int, status: int) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.returncode: int | None = None
        self._stdout = stdout
        self._stderr = stderr
        self._status = status  # the read end of the pipe the server writes the status on
        self._status_lock = threading.Lock()
        self._communicating = threading.Lock()
        self._communicated = False

    def poll(self) -> int | None:
        """Return the exit status if the server has reported it, else None."""
        # A thread waiting for the status holds the lock: the worker runs, as far as
        # anyone knows, and the waiting thread will read the status.
        if self.returncode is None and self._status_lock.acquire(blocking=False):
            try:
                if self._status >= 0 and select.select([self._status], [], [], 0)[0]:
                    self._read_status()
            finally:
                self._status_lock.release()
        return self.returncode

    def wait(self) -> int:
        """Wait for the exit status."""
        with self._status_lock:
            if self.returncode is None:
                self._read_status()
        assert self.returncode is not None
        return self.returncode

    def _read_status(self) -> None:
        data = os.read(self._status, _INT.size)  # written at once: never split
        os.close(self._status)
        self._status = -1
        if len(data) == _INT.size:
            (self.returncode,) = _INT.unpack(data)
            return
        # The server died before reaping the worker: no status will come, so the
        # worker (an orphan now, if it still runs) is killed and reported so.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.returncode = -int(signal.SIGKILL)

    def kill(self) -> None:
        """Kill the worker unless it is known to have exited."""
        if self.poll() is None:
            # The server reports the status as soon as it reaps, so a pid not yet
            # reported is the worker's (or for an instant free: no-one else's yet).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def communicate(self, data: bytes = b"", timeout: float | None = None) -> tuple[bytes, bytes]:
        """Write `data` to stdin and close it; read stdout and stderr to their end; wait.

        A second call (from another thread) waits for the first and returns nothing.
        `timeout` is taken for `Popen`'s signature; the caller kills the worker first.
        """
        del timeout
        with self._communicating:
            if self._communicated:
                self.wait()
                return b"", b""
            self._communicated = True
            errors: list[bytes] = []
            reader = threading.Thread(target=lambda: errors.append(_read_all(self._stderr)))
            reader.start()
            try:
                if self.stdin is not None:
                    with contextlib.suppress(BrokenPipeError):  # it died: stderr says why
                        self.stdin.write(data)
                    with contextlib.suppress(BrokenPipeError):
                        self.stdin.close()  # closes the pipe even when the flush fails
                    self.stdin = None
                out = _read_all(self._stdout)
            finally:
                reader.join()
            self.wait()
            return out, errors[0] if errors else b""


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


class ForkServer:
    """A process that has imported the SDK and forks workers on request.

    Args:
        python: The interpreter to start.
        preload: Modules the server imports besides the SDK (third-party libraries
            the program's modules import; never the program's own modules).
        env: The server's environment variables.
    """

    def __init__(self, python: str, preload: Sequence[str], env: Mapping[str, str]) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [python, "-c", _BOOT, str(child.fileno()), *preload],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # a server that fails is replaced by new interpreters
                pass_fds=[child.fileno()],
                env=dict(env),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._socket = parent
        self._lock = threading.Lock()

    def fork(self, env: Mapping[str, str], cwd: str | None) -> ForkedProcess:
        """Return a new worker whose stdin, stdout and stderr are pipes to this process.

        Raises:
            OSError: The server is gone.
        """
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        status_r, status_w = os.pipe()
        theirs = [stdin_r, stdout_w, stderr_w, status_w]
        mine = [stdin_w, stdout_r, stderr_r, status_r]
        try:
            blob = json.dumps({"env": dict(env), "cwd": cwd}).encode()
            with self._lock:
                socket.send_fds(self._socket, [b"F"], theirs)
                self._socket.sendall(_INT.pack(len(blob)) + blob)
                (pid,) = _INT.unpack(_receive(self._socket, _INT.size))
        except BaseException:
            for fd in mine:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return ForkedProcess(pid, os.fdopen(stdin_w, "wb"), stdout_r, stderr_r, status_r)

    def close(self) -> None:
        """Stop the server (its workers are the pool's to stop)."""
        self._socket.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the fork server closed its socket")
        data += chunk
    return data


# -- the server's side ----------------------------------------------------------------------


def serve(fd: int, preload: Sequence[str]) -> None:
    """Import the SDK and `preload`, then fork a worker per request on socket `fd`."""
    from . import testing  # noqa: F401 - what every worker would import first

    for name in preload:
        with contextlib.suppress(Exception):  # a worker that needs it fails there, with a message
            __import__(name)
    control = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wake-up fd is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it by closing the socket
    statuses: dict[int, int] = {}  # pid -> the pipe to write its exit status on
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 4096)
                _reap(statuses)
            elif not _fork_one(control, statuses, lambda: _close_in_child(control, wake_r, wake_w)):
                os._exit(0)


def _fork_one(control: socket.socket, statuses: dict[int, int], clean: Callable[[], None]) -> bool:
    try:
        _, fds, _, _ = socket.recv_fds(control, 1, 4)
        if len(fds) != 4:
            return False
        (size,) = _INT.unpack(_receive(control, _INT.size))
        request = json.loads(_receive(control, size))
    except (OSError, ValueError):
        return False  # the parent closed its end
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        clean()
        for closed in statuses.values():
            os.close(closed)
        _become_worker(fds, request)
    os.close(fds[0])
    os.close(fds[1])
    os.close(fds[2])
    statuses[pid] = fds[3]
    control.sendall(_INT.pack(pid))
    return True


def _reap(statuses: dict[int, int]) -> None:
    while statuses:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = statuses.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, _INT.pack(os.waitstatus_to_exitcode(status)))
            os.close(fd)


def _close_in_child(control: socket.socket, wake_r: int, wake_w: int) -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    control.close()
    os.close(wake_r)
    os.close(wake_w)


def _become_worker(fds: list[int], request: Mapping[str, object]) -> None:
    from ._replay_worker import main

    try:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        os.close(fds[3])
        env = request.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update({str(k): str(v) for k, v in env.items()})
        cwd = request.get("cwd")
        if isinstance(cwd, str):
            os.chdir(cwd)
        sys.argv[:] = ["-c"]  # as in a new interpreter started with -c
    except BaseException:
        os._exit(70)
    main()  # ends the process
    os._exit(1)
