"""Dispatch: the registry of functions, their configuration, endpoint and API client."""

from __future__ import annotations

__all__ = ["Batch", "Dispatch"]

import asyncio
import contextlib
import errno
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, overload

from aiohttp import web

from ._batch import BATCH_PATH
from ._client import DEFAULT_TIMEOUT, Call, Client
from ._config import DATA_DIR, Config
from ._endpoint import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_SIGNED_BODY_SIZE,
    RUN_PATH,
    Endpoint,
    EndpointServer,
)
from ._function import Function
from ._logs import LOG_FORMAT, configure_default_logging, log_format_from_env
from ._policy import FunctionPolicy, RateLimit, RetryPolicy, seconds
from ._serving import (
    IDLE_TIMEOUT,
    ConnectionGuard,
    default_connection_limit,
    quiet_accept_errors,
    raise_file_limit,
    tune_garbage_collector,
)
from ._status import Classifier, Status
from ._sync import Executor, ProcessPools
from .asgi import ASGIEndpoint
from .durable import Detection, DivergencePolicy, Runner
from .errors import ConfigurationError
from .http import Response, response_status

if TYPE_CHECKING:
    from ._embedded import EmbeddedScheduler

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
_E = TypeVar("_E", bound=BaseException)
_T = TypeVar("_T")

_AsyncFn = Callable[P, Coroutine[Any, Any, R]]
_SyncFn = Callable[P, R]


class Dispatch:
    """An application's durable functions, with their endpoint and Dispatch API client.

    Register functions with ``@dispatch.function``; serve them with `run` (blocking),
    `serve`, `start`, or by mounting `routes` into an aiohttp application; submit calls
    with ``await fn.dispatch(...)`` or `batch`. Several objects can live in one process:
    nothing is shared between them.

    Where the calls run is configuration alone. With ``DISPATCH_API_URL`` set (as
    ``dispatch-aio run`` and ``server`` print it), the object serves its endpoint over
    HTTP to that scheduler. Without it, the object runs its own scheduler in this
    process, on the SQLite database of its data folder (``DISPATCH_DATA_DIR``, default
    ``.dispatch``): `run`, `serve`, `start` and `cleanup_ctx` start it, and a script
    killed mid-call finishes its accepted calls when it runs again. Its API is served on
    loopback for ``dispatch-aio calls``/``show`` and other programs
    (``DISPATCH_SCHEDULER_ADDR``). One line at start says which mode runs.

    Configuration comes from the arguments, else from the environment. It is read only
    when it is needed, not here: the API key when a call is submitted, the endpoint
    address and verification key when serving starts.

    Use ``async with dispatch:`` or ``await dispatch.aclose()`` to release the client
    session and the suspended runs kept in memory; serving does it when it stops.

    Args:
        api_key: The Dispatch API key (``DISPATCH_API_KEY``).
        api_url: The Dispatch API base URL (``DISPATCH_API_URL``, default
            ``https://api.dispatch.run``).
        endpoint_url: The URL at which the scheduler reaches this application
            (``DISPATCH_ENDPOINT_URL``); given to the calls this object submits.
        endpoint_addr: The ``host:port`` that `run`, `serve` and `start` bind
            (``DISPATCH_ENDPOINT_ADDR``, default ``127.0.0.1:8000``).
        verification_key: The public key of the scheduler that signs Run requests
            (``DISPATCH_VERIFICATION_KEY``), PEM or base64; without it requests are not
            verified.
        insecure: Serve unsigned Run requests from other machines when no verification
            key is set (``DISPATCH_INSECURE``); otherwise they are refused, however the
            endpoint is served, and `run`, `serve` and `start` refuse a non-loopback address.
        data_dir: The folder of the embedded scheduler's database (``DISPATCH_DATA_DIR``,
            default ``.dispatch``); one process at a time may use it.
        scheduler_addr: The ``host:port`` the embedded scheduler serves its API on
            (``DISPATCH_SCHEDULER_ADDR``; default ``127.0.0.1:0``, a free port), or
            ``"off"``.
        env: The environment to read instead of `os.environ`.
        max_body_size: Largest accepted Run request body, in bytes (16,000,000).
        max_signed_body_size: Largest accepted body of a Run request whose signature
            checks out (verified before the body is read), in bytes (1,000,000,000):
            a resume carrying a whole journal may exceed `max_body_size`.
        body_timeout: Seconds a client may take to send a Run request body.
        api_timeout: Seconds a request to the Dispatch API may take (5).
        cache_size: Suspended runs kept live in memory, so that they resume without
            replaying their journal; 0 disables the cache.
        cache_idle_timeout: Seconds after which an unused live run is dropped.
        live_timer_threshold: Timers due within this many seconds are waited out while
            the run stays live, instead of suspending it.
        shutdown_timeout: Seconds in-flight runs get to finish when serving stops.
        idle_timeout: Seconds a connection to the endpoint may stay open without a
            complete request (half-sent headers included) before it is closed.
        on_divergence: What a run that diverges from its journal (code changed without
            `dispatch_aio.patched`, or a nondeterministic branch) does to its call:
            ``"restart"`` (the default) runs the call again from its input, its leaf
            side effects included; ``"fail"`` ends it with
            `dispatch_aio.errors.NondeterminismError`. Functions may choose their own.
        nondeterminism: What reading the clock or randomness directly inside a durable
            function does: ``"off"`` (the default), ``"warn"`` (logged once per place,
            with the line and the replacement to use) or ``"fail"``.
        version: This application's version: recorded in the journals it writes (and
            named in divergence reports), and given to the calls it submits
            (``Call.version``), which a scheduler may route by.
        max_connections: Connections the endpoint keeps open at most; past it, the
            oldest connection without a request in progress is closed. Default: a
            quarter of the open-file limit (raised to its maximum at start), at most
            4096.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        endpoint_url: str | None = None,
        endpoint_addr: str | None = None,
        verification_key: str | None = None,
        insecure: bool | None = None,
        data_dir: str | None = None,
        scheduler_addr: str | None = None,
        env: Mapping[str, str] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_signed_body_size: int = DEFAULT_MAX_SIGNED_BODY_SIZE,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        api_timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = 1024,
        cache_idle_timeout: float = 300.0,
        live_timer_threshold: float = 1.0,
        shutdown_timeout: float = 30.0,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int | None = None,
        on_divergence: DivergencePolicy = "restart",
        nondeterminism: Detection = "off",
        version: str = "",
    ) -> None:
        self._config = Config(
            api_key=api_key,
            api_url=api_url,
            endpoint_url=endpoint_url,
            endpoint_addr=endpoint_addr,
            verification_key=verification_key,
            insecure=insecure,
            data_dir=data_dir,
            scheduler_addr=scheduler_addr,
            env=env,
        )
        self._functions: dict[str, Function[Any, Any]] = {}
        self._classifier = Classifier()
        self._runner_options: dict[str, Any] = {
            "cache_size": cache_size,
            "cache_idle_timeout": cache_idle_timeout,
            "live_timer_threshold": live_timer_threshold,
            "on_divergence": on_divergence,
            "nondeterminism": nondeterminism,
            "version": version,
            "divergence_policy": self._divergence_policy,
        }
        self._runner: Runner | None = None
        self._shutdown_timeout = shutdown_timeout
        self._max_body_size = max(max_body_size, max_signed_body_size)  # checked per request
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout!r}")
        if max_connections is not None and max_connections <= 0:
            raise ValueError(f"max_connections must be positive, got {max_connections!r}")
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._embedded: EmbeddedScheduler | None = None
        self._processes = ProcessPools()
        self._client = Client._with_config(
            self._config, timeout=api_timeout, embedded=lambda: self._embedded, version=version
        )
        self._endpoint = Endpoint(
            self._config,
            self._functions,
            self._get_runner,
            max_body_size=max_body_size,
            max_signed_body_size=max_signed_body_size,
            body_timeout=body_timeout,
        )
        # A function returning an http.Response reports the status of its HTTP code.
        self._classifier.register_output_type(Response, response_status)

    def __repr__(self) -> str:
        return f"<Dispatch {len(self._functions)} functions, {self._config!r}>"

    # -- functions --------------------------------------------------------------------

    @overload
    def function(self, fn: _AsyncFn[P, R], /) -> Function[P, R]: ...

    @overload
    def function(self, fn: _SyncFn[P, R], /) -> Function[P, R]: ...

    @overload
    def function(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        on_divergence: DivergencePolicy | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        expiration: float | timedelta | None = None,
        concurrency: int | None = None,
        rate_limit: RateLimit | None = None,
        executor: Executor | None = None,
    ) -> _Register: ...

    def function(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        on_divergence: DivergencePolicy | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        expiration: float | timedelta | None = None,
        concurrency: int | None = None,
        rate_limit: RateLimit | None = None,
        executor: Executor | None = None,
    ) -> Function[Any, Any] | _Register:
        """Register a function: an ``async def`` durable function, or a plain ``def`` leaf.

        Use it bare (``@dispatch.function``) to register the function under its
        qualified name, or with a name (``@dispatch.function(name="resize")``). The name
        must match ``^[a-zA-Z_][a-zA-Z0-9_<>.]*$`` and be unique in this object.

        A plain ``def`` (blocking code: a CPU task, a synchronous SDK) runs whole in a
        thread of the event loop's default executor, or with ``executor="process"`` in
        a process of a pool this object starts (the function must then be defined at
        module level). It is called and dispatched like any other function but cannot
        make durable calls itself.

        Args:
            fn: The function.
            name: The name it is called under; default ``fn.__qualname__``.
            on_divergence: This function's divergence policy (``"restart"`` or
                ``"fail"``); default: the `Dispatch` object's.
            retry: How the scheduler retries the function's failed attempts
                (`RetryPolicy`: attempts, backoff, statuses retried); default: the
                scheduler's (10 attempts, the temporary statuses).
            timeout: Seconds (or a `timedelta`) one attempt may take: one run from the
                input, or one resume of a suspended function. An attempt that takes
                longer fails with STATUS_TIMEOUT and counts towards ``retry``'s
                ``max_attempts``. Default: the scheduler's request timeout (300 s).
            expiration: Seconds a call may take in all, retries and suspensions
                included; past it the call fails with STATUS_TIMEOUT. Default: the
                scheduler's (7 days). A call's own ``Call.expiration`` wins.
            concurrency: Attempts of the function in flight at once across the
                scheduler (all its calls, all callers); calls beyond it wait their turn,
                first come first served. A suspended call holds no slot.
            rate_limit: How often runs of the function may start (`RateLimit`, a token
                bucket); runs without a token wait.
            executor: For a plain ``def``: ``"thread"`` (the default) or ``"process"``.

        The policy travels with every call of the function (``Call.policy``, which
        other schedulers ignore; the expiration in the protocol's ``Call.expiration``),
        and dispatch_aio's scheduler keeps it with the call, so a restarted scheduler
        applies it still. ``dispatch_aio.testing`` honours ``retry``.

        Returns:
            The `Function`, or a decorator that registers one.

        Raises:
            TypeError: `fn` is not a function, `executor` was given for an ``async def``,
                a name was passed positionally, or ``retry``/``rate_limit`` has the wrong
                type.
            ValueError: The name is invalid or already registered, or a policy value is
                out of range (a timeout that is not positive, concurrency below 1 ...).
        """
        if fn is None:
            policy = FunctionPolicy(
                retry=retry,
                timeout=seconds(timeout, "timeout"),
                expiration=seconds(expiration, "expiration"),
                concurrency=concurrency,
                rate_limit=rate_limit,
            )
            return _Register(self, name, on_divergence, policy, executor)
        if isinstance(fn, str):
            raise TypeError(
                f"@dispatch.function({fn!r}): pass the name as a keyword, "
                f"@dispatch.function(name={fn!r})"
            )
        return self._register(fn, name, None, None, None)

    def _register(
        self,
        fn: Callable[..., Any],
        name: str | None,
        on_divergence: DivergencePolicy | None,
        policy: FunctionPolicy | None,
        executor: Executor | None,
    ) -> Function[Any, Any]:
        if isinstance(fn, Function):
            raise TypeError(f"{fn!r} is already a registered function")
        function: Function[Any, Any] = Function(
            fn, name, owner=self, on_divergence=on_divergence, policy=policy, executor=executor
        )
        existing = self._functions.get(function.name)
        if existing is not None:
            where = f"{existing.__wrapped__.__module__}.{existing.__wrapped__.__qualname__}"
            raise ValueError(
                f"a function named {function.name!r} is already registered (by {where}); "
                "pass name= to register this one under another name"
            )
        self._functions[function.name] = function
        return function

    @property
    def functions(self) -> Mapping[str, Function[Any, Any]]:
        """The registered functions by name (read-only)."""
        return MappingProxyType(self._functions)

    def register_error_type(
        self, cls: type[_E], status_or_fn: Status | Callable[[_E], Status]
    ) -> None:
        """Set the status of functions of this object that raise `cls` (or a subclass).

        See `Status` for which statuses are retried.

        Args:
            cls: The exception class.
            status_or_fn: The status, or a function of the exception returning it.
        """
        self._classifier.register_error_type(cls, status_or_fn)

    def register_output_type(
        self, cls: type[_T], status_or_fn: Status | Callable[[_T], Status]
    ) -> None:
        """Set the status of functions of this object that return a `cls` value.

        Args:
            cls: The type of the returned value.
            status_or_fn: The status, or a function of the value returning it.
        """
        self._classifier.register_output_type(cls, status_or_fn)

    # -- submitting calls ---------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The Dispatch API client that submits this object's calls."""
        return self._client

    def batch(self) -> Batch:
        """Return an empty batch of calls, submitted together by `Batch.submit`."""
        return Batch(self)

    # -- serving ----------------------------------------------------------------------

    def routes(self, prefix: str = "") -> list[web.RouteDef]:
        """Return the endpoint's routes, to mount in an aiohttp application.

        ::

            app = web.Application()
            app.add_routes(dispatch.routes())
            app.cleanup_ctx.append(dispatch.cleanup_ctx)

        The routes are ``POST {prefix}/dispatch.sdk.v1.FunctionService/Run`` and, for this
        SDK's scheduler, ``POST {prefix}/dispatch_aio.v1.FunctionService/RunBatch`` (several
        Run requests in one exchange); the endpoint URL given to the scheduler
        (``DISPATCH_ENDPOINT_URL``) must then end with the prefix. Mounting in a
        sub-application (``app.add_subapp("/dispatch", sub)``) works too. Appending
        `cleanup_ctx` checks the configuration at startup and releases this object's
        resources at cleanup. Middlewares of the application must leave the request body
        unread. A mounted endpoint cannot know the address it is served on, so without a
        verification key it only logs a warning (`start` also refuses a non-loopback
        address).

        Args:
            prefix: A path prefix such as ``"/dispatch"``, or ``""``.

        Returns:
            The route definitions, for ``app.add_routes``.
        """
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(
                f"invalid route prefix {prefix!r}: it must start with '/' and not end with "
                "one, e.g. '/dispatch'"
            )
        return [
            web.post(prefix + RUN_PATH, self._endpoint.handle),
            web.post(prefix + BATCH_PATH, self._endpoint.handle_batch),
        ]

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: ``app.cleanup_ctx.append(dispatch.cleanup_ctx)``.

        At startup it starts the embedded scheduler when no API URL is set, else checks
        the verification key (and warns without one); at cleanup, after in-flight
        requests, it closes this object (`aclose`). See `lifespan`.
        """
        async with self.lifespan(app):
            yield

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start this object with an application, and close it when the application stops.

        An async context manager, in the form ASGI frameworks take::

            app = FastAPI(lifespan=dispatch.lifespan)

        On entry it starts the embedded scheduler when no API URL is set, else checks
        the verification key (and warns without one); on exit it closes this object
        (`aclose`).

        Args:
            app: The application (unused; frameworks pass it).
        """
        if self._config.embedded():
            await self._start_embedded()
        else:
            self._endpoint.prepare()
        try:
            yield
        finally:
            await self.aclose()

    def asgi(self) -> ASGIEndpoint:
        """Return the endpoint as an ASGI application.

        It serves the paths of `routes` (``POST .../dispatch.sdk.v1.FunctionService/Run``
        and the batch route of this SDK's scheduler) with their checks (signatures,
        limits, Connect errors) and answers 404 elsewhere. Served alone (``uvicorn
        app:endpoint`` with ``endpoint = dispatch.asgi()``) it runs `lifespan` itself. In
        FastAPI or Starlette, add it as the route of those paths (or mount it under a
        prefix) and pass `lifespan` to the application, which does not forward lifespan
        events to routes::

            app = FastAPI(lifespan=dispatch.lifespan)
            endpoint = dispatch.asgi()
            for path in dispatch_aio.asgi.PATHS:
                app.add_route(path, endpoint, methods=["POST"])

        Returns:
            The ASGI application.
        """
        return ASGIEndpoint(self._endpoint, self.lifespan)

    def endpoint_addr(self) -> tuple[str, int]:
        """Return the ``(host, port)`` the endpoint binds (``DISPATCH_ENDPOINT_ADDR``).

        Useful to serve `routes` from an application of your own on the same address.

        Raises:
            dispatch_aio.errors.ConfigurationError: The address is invalid.
        """
        return self._config.endpoint_addr()

    async def start(self) -> EndpointServer:
        """Serve the functions until the returned server is closed.

        ::

            async with await dispatch.start() as server:
                print(server.url)

        With ``DISPATCH_API_URL`` set, the endpoint is served over HTTP on
        ``DISPATCH_ENDPOINT_ADDR``. Without it, the embedded scheduler starts and runs
        the functions in this process; nothing listens on the endpoint address then.

        Returns:
            The running server; close it with ``await server.aclose()``.

        Raises:
            dispatch_aio.errors.ConfigurationError: The address or verification key is
                invalid, or the address is not a loopback one while no verification key
                is set and insecure mode is off; or the data folder cannot be created.
            dispatch_aio.scheduler.StoreError: Another process uses the data folder, or
                its database is damaged.
            OSError: The address cannot be bound (for example, it is in use).
        """
        self._default_logging(forced=False)
        if self._config.embedded():
            embedded = await self._start_embedded()
            host, port = self._config.endpoint_addr()
            return EndpointServer.embedded(embedded, host, port, self.aclose)
        host, port = self._config.endpoint_addr()
        self._endpoint.check_bind(host, port)
        file_limit = raise_file_limit()
        guard = ConnectionGuard(
            self._max_connections or default_connection_limit(file_limit), "the endpoint"
        )
        app = web.Application(client_max_size=self._max_body_size, middlewares=[guard.middleware])
        app.add_routes(self.routes())
        app.cleanup_ctx.append(self.cleanup_ctx)
        # No access log: the scheduler's Run requests would drown the app's own lines.
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
            access_log=None,
            keepalive_timeout=self._idle_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        guard.attach(runner.server)
        quiet_accept_errors(asyncio.get_running_loop())
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, _bind_failure(host, port, exc)) from None
        except BaseException:
            await runner.cleanup()
            raise
        server = EndpointServer(runner, site, host)
        _announce(
            f"serving Dispatch functions on {server.url}, for the scheduler at "
            f"{self._config.api_url()}"
        )
        return server

    async def _start_embedded(self) -> EmbeddedScheduler:
        # Imported here: an app served by another scheduler never loads this one.
        from ._embedded import EmbeddedScheduler

        if self._embedded is not None:
            raise RuntimeError(
                "this Dispatch object already runs its scheduler: close the server first"
            )
        embedded = EmbeddedScheduler(
            self._config, self._endpoint, self._config.local_endpoint_url()
        )
        # Known before it starts: the calls it picks up may submit calls as they run.
        self._embedded = embedded
        try:
            await embedded.start()
        except BaseException:
            self._embedded = None
            raise
        api = f", web UI on {embedded.ui_url}" if embedded.ui_url else ""
        unfinished = embedded.scheduler.unfinished
        resumed = f"; {unfinished} unfinished calls picked up" if unfinished else ""
        _announce(
            f"running Dispatch functions with the embedded scheduler (DISPATCH_API_URL is "
            f"not set): calls kept in {embedded.database} ({DATA_DIR}){api}{resumed}"
        )
        return embedded

    async def serve(self) -> None:
        """Serve the endpoint on ``DISPATCH_ENDPOINT_ADDR`` until cancelled.

        On cancellation the server stops accepting connections, lets in-flight runs
        finish (for up to `shutdown_timeout` seconds), releases its resources and
        re-raises the cancellation.

        Raises:
            dispatch_aio.errors.ConfigurationError: As `start`.
            OSError: As `start`.
        """
        server = await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            # Shielded: the shutdown must not see this task's cancellation.
            await asyncio.shield(server.aclose())

    def run(self) -> None:
        """Serve the endpoint on ``DISPATCH_ENDPOINT_ADDR`` until SIGINT or SIGTERM.

        Blocks; runs its own event loop. On the first signal the server stops gracefully
        (as `serve`), and this returns; a second SIGINT interrupts the shutdown.

        When the application has not configured logging (the root logger has no
        handler), records of level INFO and above go to standard error while it runs,
        those of `dispatch_aio.get_logger` loggers included (with the call id, function
        and attempt); ``DISPATCH_LOG_FORMAT=json`` writes one JSON object per line.

        When it cannot start (a setting is wrong, the port is taken, the scheduler's
        database is in use, damaged or out of reach), it prints why on one line and the
        program exits with status 1.

        Raises:
            RuntimeError: An event loop runs in this thread already.
            SystemExit: It could not start (`start` raised ``ConfigurationError``,
                ``OSError`` or ``StoreError``).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "dispatch.run() cannot be called from a running event loop: it runs its own "
                "and blocks; in async code use `await dispatch.serve()` or `await "
                "dispatch.start()`"
            )
        handler = self._default_logging(forced=True)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(self._serve_until_signal())
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)

    async def _serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        try:
            server = await self.start()
        except Exception as exc:
            from .scheduler.store import StoreError  # here: only an app running it loads it

            if not isinstance(exc, ConfigurationError | StoreError | OSError):
                raise
            # The program cannot start where it runs (its database, its port, its
            # settings): one line that says why, as a command would, not a traceback.
            raise SystemExit(f"dispatch.run(): cannot start: {exc}") from None
        tune_garbage_collector()  # the process is ours: see `_serving`
        signals = (signal.SIGINT, signal.SIGTERM)
        installed = []
        for sig in signals:
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # no signals here: Ctrl-C only
                pass
        try:
            await stop.wait()
            logger.info("stopping: waiting for in-flight runs to finish")
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await server.aclose()

    def _default_logging(self, *, forced: bool) -> logging.Handler | None:
        """Print log records (durable loggers' too) when the application configured none.

        `run` always does; `start` does when ``DISPATCH_LOG_FORMAT`` is set, as
        ``dispatch-aio run`` sets it for its application.
        """
        try:
            log_format = log_format_from_env(self._config.environ())
        except ValueError as exc:
            raise ConfigurationError(str(exc), variable=LOG_FORMAT) from None
        if log_format is None and not forced:
            return None
        return configure_default_logging(log_format or "text")

    # -- resources ----------------------------------------------------------------------

    def _get_runner(self) -> Runner:
        if self._runner is None:
            self._runner = Runner(self._lookup, classifier=self._classifier, **self._runner_options)
        return self._runner

    def _process_pools(self) -> ProcessPools:
        return self._processes

    def _divergence_policy(self, name: str) -> DivergencePolicy | None:
        function = self._functions.get(name)
        return None if function is None else function.on_divergence

    def _lookup(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]] | None:
        function = self._functions.get(name)
        return None if function is None else function.fn

    async def aclose(self) -> None:
        """Close the API client's session and drop the suspended runs kept in memory.

        The object stays usable: resources are created again when needed.
        """
        runner, self._runner = self._runner, None
        embedded, self._embedded = self._embedded, None
        try:
            if embedded is not None:
                await embedded.close()  # first: no run starts after this
            await self._client.aclose()
        finally:
            self._endpoint.reset()
            self._processes.shutdown()
            if runner is not None:
                await runner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = "the address is in use (is the app already running?)"
    else:
        why = exc.strerror or str(exc)
    return (
        f"cannot serve the endpoint on {where} (DISPATCH_ENDPOINT_ADDR): {why}; stop what "
        "uses it, or set DISPATCH_ENDPOINT_ADDR to another address (port 0 picks a free one)"
    )


def _announce(line: str) -> None:
    """Log the start-up line; print it when logging is not configured, so it shows."""
    if logger.hasHandlers():  # logging is configured: its level decides
        logger.info("%s", line)
    else:
        sys.stderr.write(f"dispatch_aio: {line}\n")
        sys.stderr.flush()


class _Register:
    """The decorator returned by ``@dispatch.function(...)`` with options."""

    def __init__(
        self,
        dispatch: Dispatch,
        name: str | None,
        on_divergence: DivergencePolicy | None,
        policy: FunctionPolicy | None,
        executor: Executor | None,
    ) -> None:
        self._args = (name, on_divergence, policy, executor)
        self._dispatch = dispatch

    @overload
    def __call__(self, fn: _AsyncFn[P, R], /) -> Function[P, R]: ...

    @overload
    def __call__(self, fn: _SyncFn[P, R], /) -> Function[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Function[Any, Any]:
        return self._dispatch._register(fn, *self._args)


class Batch:
    """Calls submitted together, atomically, by `submit`.

    ::

        batch = dispatch.batch()
        batch.add(resize, "a.png", width=100)
        batch.add(resize, "b.png", width=200)
        ids = await batch.submit()

    Arguments are encoded when a call is added.
    """

    def __init__(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch
        self._calls: list[Call] = []

    def add(self, fn: Function[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Add a call to `fn`, a function of the batch's `Dispatch` object.

        Raises:
            ValueError: `fn` is registered with another `Dispatch` object.
            TypeError: An argument cannot be encoded.
        """
        if fn._owner is not self._dispatch:
            raise ValueError(
                f"{fn.name} is not a function of this batch's Dispatch object; use the "
                "batch() of the Dispatch object it is registered with, or add_call()"
            )
        self._calls.append(Call(fn.name, args, kwargs, policy=fn.policy))

    def add_call(self, call: Call) -> None:
        """Add a call described by a `Call` (any function name and endpoint)."""
        self._calls.append(call)

    def __len__(self) -> int:
        return len(self._calls)

    async def submit(self) -> list[str]:
        """Submit the calls in one request (all are created or none) and empty the batch.

        If the submission fails, the calls stay in the batch.

        Returns:
            The dispatch ids, in the order the calls were added.

        Raises:
            dispatch_aio.errors.DispatchError: As `Client.dispatch`.
        """
        calls = list(self._calls)
        ids = await self._dispatch.client.dispatch(calls)
        del self._calls[: len(calls)]
        return ids
