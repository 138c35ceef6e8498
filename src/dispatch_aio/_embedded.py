"""The scheduler embedded in an application: ``python app.py`` alone runs durably.

When no Dispatch API is configured (no ``DISPATCH_API_URL``), a `Dispatch` object runs
the local scheduler's engine in its own process, on the SQLite database of its data
folder (``.dispatch``, ``DISPATCH_DATA_DIR``). Run requests for the application's own
endpoint URL are handed to its endpoint in memory: no HTTP, no signature, no second
process, and no body size limit. Calls for other endpoints go out over HTTP, signed, as
from ``dispatch-aio server``. The semantics are the protocol's all the same: the journal
travels as coroutine state, and statuses, retries, expirations, tail calls and Polls
behave as with the separate scheduler.

The scheduler also serves its API on loopback (``DISPATCH_SCHEDULER_ADDR``, a free port
by default, ``off`` for none) and publishes the address and key in the data folder, so
that ``dispatch-aio calls`` and ``show`` run in the same folder inspect it and other
programs can submit calls to it.

One process at a time owns a data folder: a second one is refused with a message that
says so.
"""

from __future__ import annotations

__all__ = ["EmbeddedScheduler"]

import asyncio
import contextlib
import logging
from pathlib import Path

from ._config import API_KEY, DATA_DIR, SCHEDULER_ADDR, Config
from ._datadir import prepare_data_dir, publish_connection
from ._endpoint import Endpoint
from .errors import ConfigurationError
from .proto.sdk.v1 import call_pb2
from .proto.v1 import inspect_pb2
from .scheduler import Scheduler, SQLiteStore, StoreInUseError
from .scheduler._scheduler import FinishedCall
from .scheduler._schedules import Schedules
from .scheduler._ui import ui_address

logger = logging.getLogger("dispatch_aio")


class EmbeddedScheduler:
    """A `Scheduler` in this process, on the configured data folder.

    Args:
        config: Where the data folder, API address and key are read.
        endpoint: The application's endpoint, run in memory.
        endpoint_url: The URL of the application's calls (handed to `endpoint`).
    """

    def __init__(self, config: Config, endpoint: Endpoint, endpoint_url: str) -> None:
        self._config = config
        self._endpoint = endpoint
        self.endpoint_url = endpoint_url
        self.database = ""
        self.api_url: str | None = None
        self.ui_url: str | None = None
        self._scheduler: Scheduler | None = None
        self._connection: Path | None = None
        # Set once `start` ends: the calls it picks up run while it goes on, and those
        # that submit calls wait for it (their scheduler is this one).
        self._started = asyncio.Event()

    async def start(self) -> None:
        """Open the data folder, pick up unfinished calls and serve the API.

        Raises:
            ConfigurationError: The data folder cannot be created, or a setting is
                invalid.
            StoreError: Another process uses the data folder, or its database is
                damaged.
            OSError: The API address cannot be bound.
        """
        try:
            await self._start()
        finally:
            self._started.set()

    async def _start(self) -> None:
        data_dir = self._config.data_dir()
        addr = self._config.scheduler_addr()
        api_key = self._config.optional_api_key()  # None: the one kept in the database
        try:
            path = prepare_data_dir(data_dir)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the scheduler's data folder {data_dir!r}: "
                f"{exc.strerror or exc}; set {DATA_DIR} to a folder this program may write",
                variable=DATA_DIR,
                value=data_dir,
            ) from None
        self.database = str(path)
        scheduler = Scheduler(
            SQLiteStore(self.database),
            api_key=api_key,
            default_endpoint=self.endpoint_url,
            local={self.endpoint_url: self._endpoint.run_in_process},
        )
        try:
            await scheduler.start()
        except StoreInUseError as exc:
            raise StoreInUseError(
                f"{exc}. The application runs its own scheduler because DISPATCH_API_URL is "
                f"not set, and only one process may use a data folder: set {DATA_DIR} to "
                "another folder, or DISPATCH_API_URL to use the scheduler that runs there"
            ) from None
        self._scheduler = scheduler
        if addr is not None:
            host, port = addr
            try:
                self.api_url = await scheduler.serve(host, port)
            except OSError as exc:
                await self.close()
                raise OSError(
                    exc.errno,
                    f"cannot serve the scheduler API on {host}:{port} ({SCHEDULER_ADDR}): "
                    f"{exc.strerror or exc}; choose another address, or off",
                ) from None
            key = scheduler.api_key
            self._connection = publish_connection(data_dir, self.api_url, key)
            self.ui_url = ui_address(self.api_url, key)
            if not _is_loopback_host(host):
                logger.warning(
                    "the scheduler API listens on %s, beyond this machine, over plain HTTP: "
                    "anyone who learns its key (%s, or the random one kept in %s) can submit "
                    "calls; put it behind a TLS proxy or a firewall",
                    self.api_url,
                    API_KEY,
                    data_dir,
                )

    @property
    def scheduler(self) -> Scheduler:
        """The running scheduler."""
        if self._scheduler is None:
            raise RuntimeError("the embedded scheduler is not running")
        return self._scheduler

    @property
    def running(self) -> bool:
        """Whether the scheduler runs."""
        return self._scheduler is not None

    async def submit(self, calls: list[call_pb2.Call], idempotency_keys: list[str]) -> list[str]:
        """Submit calls with their idempotency keys, as the Dispatch RPC does."""
        await self._started.wait()
        return await self.scheduler.dispatch(calls, idempotency_keys=idempotency_keys)

    async def wait(self, dispatch_id: str, max_seconds: float | None) -> FinishedCall | None:
        """Wait for a call to finish (`Scheduler.wait_done`)."""
        await self._started.wait()
        return await self.scheduler.wait_done(dispatch_id, max_seconds)

    async def progress(self, dispatch_id: str) -> inspect_pb2.CallInfo | None:
        """What an unfinished call did so far (`Scheduler.progress`)."""
        return await self.scheduler.progress(dispatch_id)

    async def cancel(self, dispatch_id: str) -> int | None:
        """Cancel a call tree (`Scheduler.cancel`)."""
        await self._started.wait()
        return await self.scheduler.cancel(dispatch_id)

    async def send_event(self, key: str, result: call_pb2.CallResult) -> int:
        """Resolve a durable event (`Scheduler.send_event`)."""
        return await self.scheduler.send_event(key, result)

    @property
    def schedules(self) -> Schedules:
        """The scheduler's schedules."""
        return self.scheduler.schedules

    async def close(self) -> None:
        """Stop the scheduler; unfinished calls stay in the database."""
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.unlink()
            self._connection = None
        scheduler, self._scheduler = self._scheduler, None
        self.api_url = self.ui_url = None
        if scheduler is not None:
            await scheduler.close()


def _is_loopback_host(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
