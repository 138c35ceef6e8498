"""dispatch-py in a virtualenv of its own, and its programs (peers) run as subprocesses.

dispatch-py's generated protobuf modules register the same proto package as ours
(``dispatch.sdk.v1``), so the two SDKs cannot be imported in one process: dispatch-py runs
only in the peers, with the virtualenv's python.

The virtualenv is created once per requirements file and Python version, under pytest's
cache directory (so repeated local runs reuse it, and a fresh checkout, as in CI, creates
it), from the package registry pip is configured with.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ports import free_port

from dispatch_aio._codec import decode_error, decode_value
from dispatch_aio.proto.sdk.v1 import call_pb2
from dispatch_aio.scheduler import RetryPolicy, Scheduler

HERE = Path(__file__).parent
PEERS = HERE / "peers"
REQUIREMENTS = HERE / "requirements-dispatch-py.txt"

# dispatch.test's fixed API key: its scheduler accepts no other.
DISPATCH_PY_TEST_API_KEY = "916CC3D280BB46DDBDA984B3DD10059A"

_PIP_TIMEOUT = 240.0  # below the interop tests' 300 s timeout, to fail with pip's output

StartPeer = Callable[..., Awaitable["Peer"]]


class VenvError(Exception):
    """The virtualenv could not be created; `offline` when pip could not install."""

    def __init__(self, message: str, *, offline: bool) -> None:
        super().__init__(message)
        self.offline = offline


def venv_key() -> str:
    """Identify the virtualenv by its requirements and the Python that creates it."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(base: Path) -> tuple[Path, bool]:
    """Return the python of the dispatch-py virtualenv under `base`, and whether it is new.

    Concurrent test runs on one checkout wait for each other (a file lock), so the
    virtualenv is created once and never seen half-built.

    Raises:
        VenvError: Creating the virtualenv or installing dispatch-py failed.
    """
    base.mkdir(parents=True, exist_ok=True)
    key = venv_key()
    venv = base / key
    done = venv / ".complete"
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return venv_python(venv), False
        shutil.rmtree(venv, ignore_errors=True)
        _create(venv)
        done.write_text(REQUIREMENTS.read_text())
    return venv_python(venv), True


def _run(args: list[str], what: str, *, offline: bool) -> None:
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=_PIP_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise VenvError(f"{what} took more than {_PIP_TIMEOUT:g} s", offline=offline) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise VenvError(f"{what} failed (exit {proc.returncode}):\n{tail}", offline=offline)


def _create(venv: Path) -> None:
    _run([sys.executable, "-m", "venv", str(venv)], f"python -m venv {venv}", offline=False)
    python = str(venv_python(venv))
    _run(
        [python, "-m", "pip", "install", "--quiet", "--no-input", "-r", str(REQUIREMENTS)],
        f"pip install -r {REQUIREMENTS.name} (from the package registry pip is configured with)",
        offline=True,
    )
    # A set that installs but does not import (as dispatch-py 0.8.0 with the newest
    # http-message-signatures) is a broken requirements file, not a network problem.
    _run(
        [python, "-c", "import dispatch, dispatch.test, dispatch.http"],
        "importing dispatch-py in its virtualenv",
        offline=False,
    )


def peer_env(**extra: str) -> dict[str, str]:
    """The environment of a peer: ours without DISPATCH_* and Python path settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DISPATCH_", "PYTHON"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Peer:
    """A dispatch-py program running in a subprocess, with its output collected."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.err: list[str] = []
        self._changed = asyncio.Condition()
        self._eof = 0
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.lines)),
            asyncio.create_task(self._read(proc.stderr, self.err)),
        ]

    @classmethod
    async def start(cls, python: Path, program: str, *args: str, env: Mapping[str, str]) -> Peer:
        proc = await asyncio.create_subprocess_exec(
            str(python),
            str(PEERS / program),
            *args,
            env=dict(env),
            cwd=str(PEERS),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        return cls(program, proc)

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        try:
            async for raw in stream:
                async with self._changed:
                    into.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._eof += 1
                self._changed.notify_all()

    async def line(self, prefix: str, within: float = 15.0) -> str:
        """Wait for a line of stdout that starts with `prefix`; return the rest of it."""

        def find() -> str | None:
            for line in self.lines:
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            return None

        try:
            async with asyncio.timeout(within), self._changed:
                while (found := find()) is None:
                    if self._eof == len(self._readers):
                        await self.proc.wait()
                        raise AssertionError(
                            f"{self.name} exited with {self.proc.returncode} before printing "
                            f"a line starting with {prefix!r}\n{self.dump()}"
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name} printed no line starting with {prefix!r} in {within} s\n{self.dump()}"
            ) from None
        return found

    async def wait(self, within: float = 30.0) -> int:
        """Wait for the program to exit and its output to be read; return its status."""
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    def dump(self) -> str:
        out, err = "\n".join(self.lines), "\n".join(self.err[-60:])
        return f"--- {self.name} stdout ---\n{out}\n--- {self.name} stderr (tail) ---\n{err}"

    async def stop(self) -> None:
        """Kill the program and its process group, and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


# -- our side: the local scheduler, and calls run on it ------------------------------

API_KEY = "interop-api-key"
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.2)


@dataclass
class DispatchPyApp:
    peer: Peer
    url: str


async def start_app(start_peer: StartPeer, scheduler: Scheduler, **env: str) -> DispatchPyApp:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    assert scheduler.url is not None
    peer = await start_peer(
        "app.py",
        DISPATCH_API_KEY=API_KEY,
        DISPATCH_API_URL=scheduler.url,
        DISPATCH_ENDPOINT_URL=url,
        DISPATCH_ENDPOINT_ADDR=f"127.0.0.1:{port}",
        DISPATCH_VERIFICATION_KEY=scheduler.verification_key,
        **env,
    )
    return DispatchPyApp(peer, url)


async def run_call(
    scheduler: Scheduler, call: call_pb2.Call, *, within: float = 20.0, peer: Peer | None = None
) -> call_pb2.CallResult:
    """Submit `call` to our scheduler and wait for its result."""
    (dispatch_id,) = await scheduler.dispatch([call])
    try:
        async with asyncio.timeout(within):
            return await scheduler.wait(dispatch_id)
    except TimeoutError:
        where = f"\n{peer.dump()}" if peer is not None else ""
        raise AssertionError(f"{call.function} did not finish in {within} s{where}") from None


def outcome(result: call_pb2.CallResult) -> object:
    """The value of a result, or its error raised as the exception it encodes."""
    if result.HasField("error"):
        raise decode_error(result.error)
    return decode_value(result.output) if result.HasField("output") else None
