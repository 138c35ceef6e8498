"""The local scheduler as the command runs it: data folder, addresses, connection file.

The data folder is described in `dispatch_aio._datadir`.
"""

from __future__ import annotations

__all__ = [
    "CONNECTION_FILE",
    "DB_FILE",
    "DEFAULT_DATA_DIR",
    "CliError",
    "LocalScheduler",
    "SchedulerSettings",
    "check_data_dir",
    "check_endpoint_free",
    "endpoint_url_for",
    "exposure_warning",
    "format_addr",
    "parse_addr",
    "read_connection",
]

import contextlib
import errno
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Self

from .._datadir import (
    CONNECTION_FILE,
    DB_FILE,
    DEFAULT_DATA_DIR,
    prepare_data_dir,
    publish_connection,
    read_connection,
)
from ..scheduler import (
    PostgresStore,
    RetryPolicy,
    Scheduler,
    SQLiteStore,
    Store,
    StoreError,
    StoreInUseError,
)
from ..scheduler._engine import DEFAULT_IDEMPOTENCY_RETENTION
from ..scheduler.store._postgres import mask_url
from ._progress import CallTracker, TrackingStore

_ADDR = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<port6>[0-9]+)|(?P<host>[^:\[\]]+):(?P<port>[0-9]+)")
_WILDCARDS = MappingProxyType({"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"})


class CliError(Exception):
    """A failure the command reports as one message and an exit status.

    Args:
        message: What went wrong and what to do.
        code: The exit status (2 for a usage error).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def parse_addr(text: str, option: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6).

    Raises:
        CliError: The address is malformed (usage error).
    """
    match = _ADDR.fullmatch(text.strip())
    if match is None:
        raise CliError(
            f"invalid {option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000 or [::1]:8000",
            code=2,
        )
    host = match["v6"] if match["v6"] is not None else match["host"]
    port = int(match["port6"] if match["v6"] is not None else match["port"])
    if port > 65535:
        raise CliError(f"invalid {option} {text!r}: the port must be 0 to 65535", code=2)
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise CliError(
                f"invalid {option} {text!r}: {host!r} is not an IPv6 address", 2
            ) from None
    return host, port


def format_addr(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_url_for(host: str, port: int) -> str:
    """Return the URL the scheduler calls an endpoint bound to `host`:`port` at.

    An endpoint bound to every interface (``0.0.0.0``, ``::``) is called on loopback.
    """
    return "http://" + format_addr(_WILDCARDS.get(host, host), port)


def check_endpoint_free(host: str, port: int, option: str = "--endpoint") -> int:
    """Check that nothing uses `host`:`port`, so that the application can serve there.

    Args:
        host: The address the application binds.
        port: Its port; 0 picks a free port.
        option: The option the address came from (named in errors).

    Returns:
        The port: `port`, or the free port picked for 0.

    Raises:
        CliError: The address is in use, or is not an address of this machine.
    """
    where = format_addr(host, port)
    fix = (
        f"stop what uses it, or choose another address with {option} HOST:PORT (port 0 "
        "picks a free one)"
    )
    if port:
        probe = _WILDCARDS.get(host, host)
        with contextlib.suppress(OSError), socket.create_connection((probe, port), timeout=0.5):
            raise CliError(
                f"something already listens on {where}, where the application must serve its "
                f"endpoint (DISPATCH_ENDPOINT_ADDR): {fix}"
            )
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise CliError(f"cannot resolve the host of {option} {where}: {exc}", code=2) from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the application's server will: an address in TIME_WAIT is reusable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"the address {where} is in use: {fix}") from None
            raise CliError(
                f"cannot use {option} {where}: {exc.strerror or exc}; give an address of this "
                "machine, such as 127.0.0.1:8000"
            ) from None
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """How the command runs the scheduler."""

    host: str = "127.0.0.1"
    """Address the API binds."""
    port: int = 0
    """Port the API binds (0: a free one)."""
    api_key: str | None = None
    """The API key; None generates a random one."""
    data_dir: str = DEFAULT_DATA_DIR
    """Folder of the database and connection file."""
    in_memory: bool = False
    """Keep calls in memory only (nothing is written to the data folder)."""
    database: str = ""
    """A PostgreSQL URL to keep the calls in; empty: SQLite in the data folder."""
    replicas: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Endpoints served by several app processes, and the URLs of their replicas."""
    version_endpoints: tuple[tuple[str, str], ...] = ()
    """Application versions kept running at their own endpoint."""
    endpoint_url: str = ""
    """Endpoint of calls that name none."""
    max_attempts: int = RetryPolicy().max_attempts
    """Attempts in a row a function may answer with a temporary status before its error is
    final (0: retried until the call expires); see `RetryPolicy.max_attempts`."""
    run_timeout: float = 300.0
    """Seconds one Run request may take."""
    idempotency_retention: float = DEFAULT_IDEMPOTENCY_RETENTION
    """Seconds a submission's idempotency key is remembered."""
    lease_timeout: float = 9.0
    """With PostgreSQL: seconds after which a replica that stopped renewing its leases
    loses its partitions to the others."""


def check_data_dir(path: str, option: str = "--data-dir") -> str:
    """Return `path` if it can name the data folder.

    Raises:
        CliError: The path is empty or holds control characters (a newline would break
            the printed lines and the ``export`` commands), as a usage error.
    """
    if not path.strip():
        raise CliError(f"{option} is empty: give a folder, e.g. {option} .dispatch", code=2)
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise CliError(
            f"{option} {path!r} holds control characters (a newline, a tab ...): choose a "
            "folder name without them",
            code=2,
        )
    return path


def exposure_warning(host: str, port: int) -> str | None:
    """Return a warning when the API is served beyond this machine, else None."""
    if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
        return None
    where = "every interface" if host in _WILDCARDS else host
    return (
        f"the scheduler API listens on {format_addr(host, port)} ({where}), over plain HTTP: "
        "anyone who can reach it and learns the API key can submit calls, and the key travels "
        "unencrypted; put it behind a TLS proxy or a firewall"
    )


class LocalScheduler:
    """A `Scheduler` on the command's data folder, serving its API; an async context manager.

    Args:
        settings: Where and how to run.
        tracker: Told about every change of the calls.
    """

    def __init__(self, settings: SchedulerSettings, tracker: CallTracker) -> None:
        self.settings = settings
        self.tracker = tracker
        # Hex: safe in shells and never read as an option (a key may start with "-" otherwise).
        # Without --api-key: the one kept in the database, made on first use (random for
        # each run with --in-memory); known once started.
        self.api_key = settings.api_key or ""
        self.api_url = ""
        self._scheduler: Scheduler | None = None
        self._connection: Path | None = None

    @property
    def database(self) -> str:
        """Where the calls are kept: a database path or URL (password masked), or memory."""
        if self.settings.in_memory:
            return "memory only (--in-memory)"
        if self.settings.database:
            return mask_url(self.settings.database)
        return str(Path(self.settings.data_dir) / DB_FILE)

    def running(self) -> list[str]:
        """Return the dispatch ids of the calls with a Run request in flight."""
        return [] if self._scheduler is None else self._scheduler.running()

    @property
    def verification_key(self) -> str:
        """The public key endpoints verify the scheduler's requests with."""
        if self._scheduler is None:
            raise RuntimeError("the scheduler is not started")
        return self._scheduler.verification_key

    async def start(self) -> None:
        """Open the database, start the scheduler and serve its API.

        Raises:
            CliError: The data folder cannot be created, the database is in use or
                unreadable, or the API address is in use.
        """
        settings = self.settings
        store = TrackingStore(self._store(), self.tracker)
        try:
            scheduler = Scheduler(
                store,
                api_key=settings.api_key,
                default_endpoint=settings.endpoint_url,
                retry=RetryPolicy(max_attempts=settings.max_attempts),
                request_timeout=settings.run_timeout,
                idempotency_retention=settings.idempotency_retention,
                lease_timeout=settings.lease_timeout,
                replicas=dict(settings.replicas),
                version_endpoints=dict(settings.version_endpoints),
            )
        except ValueError as exc:
            raise CliError(str(exc), code=2) from None
        try:
            await scheduler.start()
        except StoreError as exc:
            if not isinstance(exc, StoreInUseError):
                raise CliError(str(exc)) from None
            raise CliError(
                f"{exc}. To run a separate scheduler, give it another folder with --data-dir "
                "PATH, or use --in-memory"
            ) from None
        self._scheduler = scheduler
        self.api_key = scheduler.api_key
        try:
            url = await scheduler.serve(settings.host, settings.port)
        except OSError as exc:
            await self.close()
            where = format_addr(settings.host, settings.port)
            if exc.errno == errno.EADDRINUSE:
                raise CliError(
                    f"cannot serve the scheduler API on {where}: the port is in use; choose "
                    "another with --port (0 picks a free one)"
                ) from None
            raise CliError(f"cannot serve the scheduler API on {where}: {exc}") from None
        # Bound to every interface: clients on this machine reach it on loopback.
        port = int(url.rpartition(":")[2])
        self.api_url = endpoint_url_for(settings.host, port) if settings.host in _WILDCARDS else url
        if settings.database:
            # The data folder only holds the connection file then: without it, the
            # inspection commands need --api-url; not worth failing for.
            with contextlib.suppress(OSError):
                prepare_data_dir(settings.data_dir)
                self._publish()
        elif not settings.in_memory:
            self._publish()

    def _store(self) -> Store:
        settings = self.settings
        if settings.in_memory:
            return SQLiteStore(":memory:")
        if settings.database:
            try:
                return PostgresStore(settings.database)
            except ValueError as exc:
                raise CliError(f"invalid --database: {exc}", code=2) from None
        return SQLiteStore(self._prepare_data_dir())

    def _prepare_data_dir(self) -> str:
        try:
            return str(prepare_data_dir(self.settings.data_dir))
        except OSError as exc:
            raise CliError(
                f"cannot create the data folder {self.settings.data_dir!r}: "
                f"{exc.strerror or exc}; choose another with --data-dir PATH, or use --in-memory"
            ) from None

    def _publish(self) -> None:
        self._connection = publish_connection(self.settings.data_dir, self.api_url, self.api_key)

    async def close(self) -> None:
        """Stop the scheduler; unfinished calls stay in the database."""
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.unlink()
            self._connection = None
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await scheduler.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
