"""The `Scheduler`: store, engine, invoker and HTTP API assembled and run together."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

from aiohttp import web

from .._serving import (
    IDLE_TIMEOUT,
    ConnectionGuard,
    default_connection_limit,
    quiet_accept_errors,
    raise_file_limit,
)
from .._signature import load_private_key, new_private_key_pem, public_key_to_base64
from ..proto.sdk.v1 import call_pb2
from ..proto.v1 import inspect_pb2
from ._api import STATE_OF_PHASE, create_app
from ._engine import (
    DEFAULT_EXPIRATION,
    DEFAULT_IDEMPOTENCY_RETENTION,
    Engine,
    EngineSettings,
    RetryPolicy,
)
from ._invoker import Invoker, LocalHandler
from ._schedules import Schedules
from ._ui import add_ui_routes, ui_address
from ._validate import endpoint_problem
from .store import Phase, SetMeta, SQLiteStore, Store

__all__ = ["FinishedCall", "Scheduler"]

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_SIGNING_KEY = "signing_key"
_API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class FinishedCall:
    """A call that is done, as `Scheduler.wait_done` returns it."""

    dispatch_id: str
    function: str
    status: int
    """The final status (a ``dispatch.sdk.v1.Status`` number)."""
    result: call_pb2.CallResult


class Scheduler:
    """The local Dispatch scheduler.

    It accepts calls through ``DispatchService.Dispatch`` (see `app` and `serve`), runs
    them by sending signed ``FunctionService.Run`` requests to their endpoints, and
    keeps every accepted call and state change in its store, so that a restarted
    scheduler on the same database finishes every call it had accepted.

    Use it as an async context manager (or call `start` and `close`)::

        async with Scheduler("dispatch.db", api_key="secret") as scheduler:
            url = await scheduler.serve("127.0.0.1", 4450)
            ...  # give the app DISPATCH_API_URL=url, DISPATCH_API_KEY="secret" and
            ...  # DISPATCH_VERIFICATION_KEY=scheduler.verification_key

    Args:
        store: A SQLite database path (created if missing), ``":memory:"`` for a
            database that lives as long as the scheduler, or a `Store`.
        api_key: The key API clients must send as ``Authorization: Bearer <key>``. None
            uses the key stored in the database, generated and stored on first use, so
            that clients keep working across restarts.
        signing_key: The Ed25519 key that signs Run requests (a key object, PEM or
            base64). By default the key stored in the database is used, and one is
            generated and stored on first use.
        default_endpoint: Endpoint URL of submitted calls that name none.
        default_expiration: Seconds a call may take when it sets no expiration
            (default 7 days); past it the call fails with STATUS_TIMEOUT.
        max_expiration: Cap on any call's expiration, in seconds (None: no cap).
        request_timeout: Seconds one Run request may take.
        retry: Backoff of calls that failed with a temporary status, and how many such
            answers in a row a function may give before its error is final (10 by
            default; an endpoint that cannot be reached is retried until the call
            expires). See `RetryPolicy`.
        max_concurrency: Ceiling of the adaptive number of concurrent Run requests to
            one endpoint (256; the window grows to it only while the endpoint shows no
            sign of overload). A function's ``concurrency`` policy bounds its own calls.
        rng: Source of the backoff jitter (seed it for reproducible delays).
        local: Endpoints served by this process, by URL: their Run requests are handed
            to the handler in memory instead of sent over HTTP (see `LocalHandler`).
        version_endpoints: Application versions kept running at their own endpoint:
            a call whose ``Call.version`` is listed (calls made by a function inherit its
            version) is run at that URL instead of its own endpoint, so that old runs
            finish on old code while new calls go to the new.
        replicas: Endpoints served by several processes, each at its own URL: the
            endpoint URL calls name, and the URLs of its replicas. A call's attempts go
            to one replica while it answers, so that its resumes find the run live
            there; another takes over when it is down or overloaded.
        idempotency_retention: Seconds a submission's idempotency key is remembered
            (24 hours by default): within that time, a submission with the same key
            returns the first one's dispatch id and creates nothing, also after a
            restart.
        cancel_grace: Seconds a suspended call being cancelled is given to run its
            ``finally:`` blocks and ``except CancelledError:`` handlers (10 by default):
            an endpoint of this SDK resumes it with ``CancelledError`` raised at its
            pending await, and it ends cancelled when that resume answers or this time
            is up. 0 ends it at once, as calls of other SDKs always do.
        lease_timeout: With a store that several schedulers share (`PostgresStore`):
            seconds after which the partitions of calls a scheduler drives go to the
            others if it stops renewing its leases (every third of this; 9 by default).
            A replica that dies has its calls carried on by the others within that time.

    Raises:
        ValueError: An argument is invalid (the message says which).
    """

    def __init__(
        self,
        store: str | Store = ":memory:",
        *,
        api_key: str | None,
        signing_key: Ed25519PrivateKey | str | bytes | None = None,
        default_endpoint: str = "",
        default_expiration: float = DEFAULT_EXPIRATION,
        max_expiration: float | None = None,
        request_timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 256,
        rng: random.Random | None = None,
        local: Mapping[str, LocalHandler] | None = None,
        replicas: Mapping[str, Sequence[str]] | None = None,
        version_endpoints: Mapping[str, str] | None = None,
        idempotency_retention: float = DEFAULT_IDEMPOTENCY_RETENTION,
        cancel_grace: float = 10.0,
        lease_timeout: float = 9.0,
    ) -> None:
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty: API clients authenticate with it")
        if default_endpoint and (problem := endpoint_problem(default_endpoint)):
            raise ValueError(f"default_endpoint {default_endpoint!r} {problem}")
        if default_expiration <= 0:
            raise ValueError(f"default_expiration must be positive, got {default_expiration}")
        if request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {request_timeout}")
        if idempotency_retention <= 0:
            raise ValueError(f"idempotency_retention must be positive, got {idempotency_retention}")
        if not lease_timeout >= 0.3:
            raise ValueError(f"lease_timeout must be at least 0.3 s, got {lease_timeout}")
        if cancel_grace < 0:
            raise ValueError(f"cancel_grace must not be negative, got {cancel_grace}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._store = SQLiteStore(store) if isinstance(store, str) else store
        self._api_key_arg = api_key
        self._api_key = api_key or ""
        self._key_arg = signing_key
        self._settings = EngineSettings(
            default_expiration=default_expiration,
            max_expiration=max_expiration,
            request_timeout=request_timeout,
            retry=retry or RetryPolicy(),
            default_endpoint=default_endpoint,
            version_endpoints=dict(version_endpoints or {}),
            idempotency_retention=idempotency_retention,
            cancel_grace=cancel_grace,
            lease_timeout=lease_timeout,
        )
        self._max_concurrency = max_concurrency
        self._rng = rng
        for url in local or {}:
            if problem := endpoint_problem(url):
                raise ValueError(f"local endpoint {url!r} {problem}")
        self._local = dict(local or {})
        for version, url in (version_endpoints or {}).items():
            if problem := endpoint_problem(url):
                raise ValueError(f"the endpoint {url!r} of version {version!r} {problem}")
        for endpoint, urls in (replicas or {}).items():
            for url in (endpoint, *urls):
                if problem := endpoint_problem(url):
                    raise ValueError(f"replica endpoint {url!r} {problem}")
            if not urls:
                raise ValueError(f"endpoint {endpoint!r} is given no replicas")
        self._replicas = {endpoint: tuple(urls) for endpoint, urls in (replicas or {}).items()}
        self._key: Ed25519PrivateKey | None = None
        self._key_pem: str | None = None  # the stored key, loaded when first used
        self._engine: Engine | None = None
        self._schedules: Schedules | None = None
        self._invoker: Invoker | None = None
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._store_open = False

    async def start(self) -> None:
        """Open the store, load the signing key and pick up every unfinished call.

        Raises:
            StoreError: The database cannot be opened (locked by another scheduler,
                newer schema, unreadable file ...).
            ValueError: The signing key given cannot be loaded.
        """
        if self._engine is not None:
            raise RuntimeError("the scheduler is already started")
        # A key given is checked now; the stored one is loaded when first needed (an app
        # running its scheduler in process never signs, and never loads `cryptography`).
        key = load_private_key(self._key_arg) if self._key_arg is not None else None
        await self._store.open()
        self._store_open = True
        try:
            self._key = key
            if key is None:
                self._key_pem = await self._stored_key()
            self._api_key = self._api_key_arg or await self._stored_api_key()
            self._invoker = Invoker(
                lambda: self.signing_key,
                max_concurrency=self._max_concurrency,
                local=self._local,
                replicas=self._replicas,
            )
            await self._invoker.open()
            self._engine = Engine(self._store, self._invoker, self._settings, rng=self._rng)
            await self._engine.start()
            if self._store.keeps_events:
                self._schedules = Schedules(self._engine, self._store)
                await self._schedules.start()
            self._app = create_app(
                self._engine, self._store, api_key=self._api_key, schedules=self._schedules
            )
            add_ui_routes(
                self._app,
                self._engine,
                self._store,
                api_key=self._api_key,
                schedules=self._schedules,
            )
        except BaseException:
            await self.close()
            raise

    async def _stored_key(self) -> str:
        """The PEM of the signing key kept in the store, made and stored on first start."""
        pem = await self._store.get_meta(_SIGNING_KEY)
        if pem is not None:
            return pem.decode("ascii")
        pem = new_private_key_pem().encode("ascii")
        await self._store.write([SetMeta(_SIGNING_KEY, pem, keep=True)])
        # Another scheduler on the same database may have stored its key first.
        stored = await self._store.get_meta(_SIGNING_KEY)
        return (stored or pem).decode("ascii")

    async def _stored_api_key(self) -> str:
        stored = await self._store.get_meta(_API_KEY)
        if stored is not None:
            return stored.decode("ascii")
        # Hex: safe in shells and never read as an option.
        key = secrets.token_hex(20)
        await self._store.write([SetMeta(_API_KEY, key.encode("ascii"), keep=True)])
        stored = await self._store.get_meta(_API_KEY)
        return (stored or key.encode("ascii")).decode("ascii")

    @property
    def api_key(self) -> str:
        """The key API clients send (known once started)."""
        if not self._api_key:
            raise RuntimeError("the scheduler is not started: the API key is not loaded")
        return self._api_key

    async def close(self) -> None:
        """Stop serving and running calls; unfinished calls stay in the store."""
        if self._schedules is not None:
            await self._schedules.close()
            self._schedules = None
        if self._engine is not None:
            await self._engine.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._url = None
        if self._invoker is not None:
            await self._invoker.close()
            self._invoker = None
        if self._store_open:
            self._store_open = False
            await self._store.close()
        self._engine = None
        self._app = None

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

    @property
    def app(self) -> web.Application:
        """The aiohttp application serving the API (to run it yourself or mount it)."""
        if self._app is None:
            raise RuntimeError("the scheduler is not started: use `async with Scheduler(...)`")
        return self._app

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the API on `host`:`port` until `close`.

        Args:
            host: Address to bind.
            port: Port to bind; 0 picks a free one.

        Returns:
            The base URL of the API (DISPATCH_API_URL), with the bound port.
        """
        if self._runner is not None:
            raise RuntimeError(f"the scheduler already serves on {self._url}")
        guard = ConnectionGuard(default_connection_limit(raise_file_limit()), "the scheduler API")
        self.app.middlewares.append(guard.middleware)
        runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=IDLE_TIMEOUT
        )
        await runner.setup()
        assert runner.server is not None
        guard.attach(runner.server)
        quiet_accept_errors(asyncio.get_running_loop())
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        self._runner = runner
        self._url = f"http://{bound_host}:{bound_port}"
        return self._url

    @property
    def url(self) -> str | None:
        """The base URL `serve` bound, or None."""
        return self._url

    @property
    def ui_url(self) -> str | None:
        """The address of the web UI, signed in with the API key, once `serve` runs."""
        return ui_address(self._url, self._api_key) if self._url else None

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        """The key that signs Run requests (known once started)."""
        if self._key is None:
            if self._key_pem is None:
                raise RuntimeError("the scheduler is not started: the signing key is not loaded")
            self._key = load_private_key(self._key_pem)
        return self._key

    @property
    def verification_key(self) -> str:
        """The public key endpoints verify requests with (DISPATCH_VERIFICATION_KEY)."""
        return public_key_to_base64(self.signing_key.public_key())

    @property
    def unfinished(self) -> int:
        """Number of calls not done yet."""
        return self._require().unfinished

    def running(self) -> list[str]:
        """Return the dispatch ids of the calls with a Run request in flight."""
        return self._require().running()

    async def dispatch(
        self, calls: Sequence[call_pb2.Call], *, idempotency_keys: Sequence[str] = ()
    ) -> list[str]:
        """Submit calls in process, as the Dispatch RPC does.

        Args:
            calls: The calls; each needs an endpoint unless `default_endpoint` is set.
            idempotency_keys: Empty, or one key per call ("" for none): a call whose
                key was submitted within the retention period is not created again, and
                its id is the first submission's.

        Returns:
            The dispatch ids, in order, once every call is persisted.

        Raises:
            ValueError: A call is invalid; none was submitted.
            StoreError: The calls could not be persisted; none was submitted.
        """
        return await self._require().submit(calls, idempotency_keys)

    async def cancel(self, dispatch_id: str) -> int | None:
        """Cancel a call and every unfinished call below it.

        Cancelled calls make no further attempts (a Run request in flight is abandoned)
        and end with an error of type ``dispatch_aio.CancelledCallError``. The call
        itself, if suspended in an endpoint of this SDK, first gets ``CancelledError``
        raised at its pending await, to clean up within ``cancel_grace`` seconds.

        Args:
            dispatch_id: The call.

        Returns:
            The number of calls stopped, or None if the call had finished already.

        Raises:
            LookupError: No call has this id.
            StoreError: The cancellation could not be persisted.
        """
        return await self._require().cancel(dispatch_id)

    async def send_event(self, key: str, result: call_pb2.CallResult) -> int:
        """Resolve a durable event (see ``dispatch_aio.wait_event``), once.

        Args:
            key: The event's key.
            result: Its outcome: the ``output`` every waiter receives, or the ``error``
                raised at their await.

        Returns:
            The number of calls that were waiting on the key and received it now.

        Raises:
            EventAlreadyResolvedError: The key was resolved already (a `ValueError`).
            ValueError: The key is invalid.
            StoreError: The event could not be stored; nothing changed.
        """
        return await self._require().send_event(key, result)

    @property
    def schedules(self) -> Schedules:
        """The schedules (create, list, pause, resume, delete), once started."""
        if self._schedules is None:
            raise RuntimeError("the scheduler is not started, or its store keeps no schedules")
        return self._schedules

    async def wait(self, dispatch_id: str) -> call_pb2.CallResult:
        """Wait for a call to finish and return its result (wrap in `asyncio.timeout`).

        Args:
            dispatch_id: The call.

        Raises:
            LookupError: There is no such call.
        """
        rec = await self._require().wait(dispatch_id)
        if rec is None:
            raise LookupError(f"no call with dispatch id {dispatch_id!r}")
        return call_pb2.CallResult.FromString(rec.result)

    async def wait_done(
        self, dispatch_id: str, max_seconds: float | None = None
    ) -> FinishedCall | None:
        """Wait for a call to finish, at most `max_seconds`; None if it still runs then.

        Raises:
            LookupError: There is no such call.
        """
        rec = await self._require().wait(dispatch_id, max_seconds)
        if rec is None:
            raise LookupError(f"no call with dispatch id {dispatch_id!r}")
        if rec.phase is not Phase.DONE:
            return None
        return FinishedCall(
            rec.id, rec.function, rec.status, call_pb2.CallResult.FromString(rec.result)
        )

    async def progress(self, dispatch_id: str) -> inspect_pb2.CallInfo | None:
        """What a call did so far: its state, attempts and last error; None if unknown."""
        rec = await self._store.get_call(dispatch_id)
        if rec is None:
            return None
        running = dispatch_id in self.running()
        return inspect_pb2.CallInfo(
            dispatch_id=rec.id,
            function=rec.function,
            state=inspect_pb2.CALL_STATE_RUNNING if running else STATE_OF_PHASE[rec.phase],
            attempts=rec.attempts,
            polls=rec.polls,
            last_error=rec.last_error,
        )

    def _require(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the scheduler is not started: use `async with Scheduler(...)`")
        return self._engine
