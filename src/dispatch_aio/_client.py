"""Client of the Dispatch API: submits calls with ``DispatchService.Dispatch``, waits for results.

The RPC is Connect unary with binary protobuf: ``POST {api_url}/dispatch.sdk.v1.
DispatchService/Dispatch``, ``Content-Type: application/proto``, ``Connect-Protocol-Version:
1`` and ``Authorization: Bearer <api key>``. Errors come back as Connect JSON bodies
(``{"code", "message"}``) and are raised as `dispatch_aio.errors.ClientError`.

Idempotency: every call submitted carries an idempotency key, the caller's
(`Call.idempotency_key`) or a random one made for that submission. The protocol's
``Call`` has no field for it, so the keys travel in ``DispatchRequest.idempotency_keys``
(field 1000, an extension of this project's copy of the schema: one key per call, in
request order), which other schedulers skip as an unknown field. dispatch_aio's scheduler
remembers each key for a retention period (24 hours by default) and answers a second
submission of it with the first one's dispatch id, creating nothing. That makes a
submission safe to send again, so the client retries it after any transport failure
(connection refused or reset, timeout) with the same keys, and keeps connections alive
between requests.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "DISPATCH_PATH",
    "Call",
    "Client",
    "EmbeddedAPI",
]

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import secrets
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Protocol, Self

import aiohttp
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from . import __version__, errors
from ._codec import decode_error, decode_value, encode_error, encode_input, encode_value
from ._config import Config
from ._function import check_function_name
from ._policy import FunctionPolicy, apply_policy
from ._schedule_client import ScheduleClient
from ._telemetry import current_carrier
from .durable import current_run, in_durable_function, run_on_host
from .proto.sdk.v1 import call_pb2, dispatch_pb2, status_pb2
from .proto.v1 import control_pb2, inspect_pb2

logger = logging.getLogger(__name__)

DISPATCH_PATH = "/dispatch.sdk.v1.DispatchService/Dispatch"
WAIT_CALL_PATH = "/dispatch_aio.v1.InspectService/WaitCall"
CANCEL_CALL_PATH = "/dispatch_aio.v1.ControlService/CancelCall"
SEND_EVENT_PATH = "/dispatch_aio.v1.ControlService/SendEvent"
DEFAULT_TIMEOUT = 5.0
"""Seconds a Dispatch request may take, connection included."""
DEFAULT_RETRIES = 2
"""Extra attempts after a transport failure (connection refused or reset, timeout)."""

_ENDPOINT_SCHEMES = ("http://", "https://", "bridge://", "arn:aws:lambda")
_RETRY_DELAY = 0.1  # first backoff, doubled at each attempt, with jitter
_WAIT_CHUNK = 30.0  # longest single wait request of Client.result()
_MAX_ERROR_TEXT = 500
_MAX_KEY = 256  # longest idempotency key the scheduler accepts


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """A call to submit with `Client.dispatch`.

    The arguments are encoded when the object is created, so a value that cannot be
    encoded fails here, naming the argument; later changes to a mutable argument are not
    seen. A single positional argument of a well-known type (str, int, float, bool,
    bytes, None, datetime, timedelta) is sent as itself, so functions written with other
    Dispatch SDKs can read it; other arguments are pickled.

    Raises:
        ValueError: The function name does not match the protocol's pattern, the
            endpoint is not an http, https or bridge URL, the expiration is negative, or
            the idempotency key is empty, too long or not printable.
        TypeError: An argument cannot be encoded.
    """

    function: str
    """Name of the function to call, as registered at the endpoint."""
    args: tuple[Any, ...] = ()
    """Positional arguments."""
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments."""
    endpoint: str | None = None
    """URL of the endpoint serving the function; None means the client's endpoint
    (``DISPATCH_ENDPOINT_URL``)."""
    expiration: timedelta | None = None
    """How long the call may take before it fails; None lets the scheduler decide."""
    version: str = ""
    """Application version to run, for schedulers that support it."""
    idempotency_key: str | None = None
    """Key of this submission: dispatch_aio's scheduler creates the call once for all the
    submissions with one key within its retention period (24 hours by default), and
    answers each with the same dispatch id. None gives the call a random key for each
    `Client.dispatch`, which makes its retries safe but not a second submission."""
    policy: FunctionPolicy | None = None
    """How dispatch_aio's scheduler runs the call (retries, attempt timeout, concurrency
    and rate limits; see `Dispatch.function`); ``fn.dispatch()`` gives the function's.
    Its expiration applies when `expiration` is None. Other schedulers ignore it."""
    _input: any_pb2.Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_function_name(self.function)
        if self.endpoint is not None and not self.endpoint.startswith(_ENDPOINT_SCHEMES):
            raise ValueError(
                f"invalid endpoint {self.endpoint!r} for a call to {self.function!r}: use an "
                "http://, https:// or bridge:// URL, or None for the client's endpoint"
            )
        if self.expiration is not None and self.expiration < timedelta(0):
            raise ValueError(f"the expiration of a call to {self.function!r} must not be negative")
        key = self.idempotency_key
        if key is not None and not (0 < len(key) <= _MAX_KEY and key.isprintable()):
            raise ValueError(
                f"invalid idempotency key {key[:40]!r} for a call to {self.function!r}: use "
                f"1 to {_MAX_KEY} printable characters, or None for a random one"
            )
        encoded = encode_input(tuple(self.args), self.kwargs, function=self.function)
        object.__setattr__(self, "_input", encoded)

    def _to_proto(self, default_endpoint: str, default_version: str = "") -> call_pb2.Call:
        """Return the protobuf form, with the defaults for what the call does not give."""
        call = call_pb2.Call(
            function=self.function,
            input=self._input,
            endpoint=self.endpoint if self.endpoint is not None else default_endpoint,
            version=self.version or default_version,
        )
        if self.expiration is not None:
            call.expiration.FromTimedelta(self.expiration)
        if self.policy is not None:
            apply_policy(call, self.policy)
        # Submitted while a span is current: the call's spans join that trace.
        call.trace_context.update(current_carrier())
        return call


class Client:
    """Client of the Dispatch API (``DispatchService``).

    Each `Dispatch` object has one, as ``dispatch.client``; build one yourself to submit
    calls to functions served elsewhere. Configuration comes from the arguments, else
    from ``DISPATCH_API_KEY``, ``DISPATCH_API_URL`` and ``DISPATCH_ENDPOINT_URL``, read
    when a call is submitted (so a missing API key is an error only then).

    The client owns an `aiohttp.ClientSession`, created inside the running event loop at
    the first request, which keeps connections alive between requests; close it with
    ``await client.aclose()`` or ``async with client:`` (a `Dispatch` object closes its
    client when it is closed). Used from another event loop after the first one ended
    (``asyncio.run()`` twice, one event loop per test), it starts a new session.

    The client of a `Dispatch` object that runs its own scheduler (no
    ``DISPATCH_API_URL``) submits to that scheduler in memory, once it is started.

    Retries: every call of a ``Dispatch`` request carries an idempotency key (its own,
    else a random one), so the client sends the request again, with the same keys, after
    any transport failure: connection refused or reset, unreachable host, DNS failure or
    no answer within the timeout. dispatch_aio's scheduler creates each call once; other
    schedulers ignore the keys, and a retry after a request that reached them may create
    calls twice. An error answer of the API is raised at once.

    Args:
        api_key: The API key; default ``DISPATCH_API_KEY``.
        api_url: The API base URL; default ``DISPATCH_API_URL``, else
            ``https://api.dispatch.run``.
        endpoint_url: The endpoint given to calls that do not name one; default
            ``DISPATCH_ENDPOINT_URL``.
        timeout: Seconds one attempt of a request may take (5 by default).
        retries: Extra attempts after a transport failure (2 by default).
        session: A session to use instead of the client's own; the client does not
            close it.
        env: The environment to read instead of `os.environ`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        session: aiohttp.ClientSession | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        config = Config(
            api_key=api_key, api_url=api_url, endpoint_url=endpoint_url, env=env, owner="Client()"
        )
        self._setup(config, timeout=timeout, retries=retries, session=session)

    @classmethod
    def _with_config(
        cls,
        config: Config,
        *,
        timeout: float,
        retries: int = DEFAULT_RETRIES,
        embedded: Callable[[], EmbeddedAPI | None] | None = None,
        version: str = "",
    ) -> Client:
        """Build a client that reads the configuration of a `Dispatch` object.

        `embedded` returns the object's embedded scheduler while it runs; the client
        uses it whenever the configuration sets no API URL.
        """
        client = cls.__new__(cls)
        client._setup(config, timeout=timeout, retries=retries, session=None)
        client._embedded = embedded
        client._version = version
        return client

    def _setup(
        self,
        config: Config,
        *,
        timeout: float,
        retries: int,
        session: aiohttp.ClientSession | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries!r}")
        self._config = config
        self._timeout = timeout
        self._retries = retries
        self._external = session
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        self._embedded: Callable[[], EmbeddedAPI | None] | None = None
        self._version = ""  # the application's, for calls that name none

    def __repr__(self) -> str:
        return f"<Client {self._config!r}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def dispatch(self, calls: Iterable[Call]) -> list[str]:
        """Submit calls atomically (all are recorded or none); return their dispatch ids.

        Calls without an endpoint get the client's endpoint URL, and calls without an
        idempotency key a random one, kept across the retries of this submission. Inside
        a durable function the request runs on the host event loop, and calls without a
        key get one that the function's replays make again (see `Function.dispatch`):
        a replay gets the same dispatch ids and creates nothing.

        Args:
            calls: The calls to submit.

        Returns:
            One dispatch id per call, in order. No request is made for no calls.

        Raises:
            dispatch_aio.errors.ConfigurationError: The API key, API URL or endpoint URL
                is missing or invalid.
            dispatch_aio.errors.ClientError: The API answered with an error (for example
                ``invalid_argument`` for two calls with one idempotency key).
            dispatch_aio.errors.DispatchTimeoutError: No answer within the timeout, at
                any attempt.
            dispatch_aio.errors.TCPError: The API could not be reached (also `DNSError`,
                `TLSError`, `HTTPError` for those failures).
            dispatch_aio.errors.InvalidResponseError: The answer is not a valid
                ``DispatchResponse``.
        """
        calls = list(calls)
        if not calls:
            return []
        run = current_run()
        if run is not None:
            # Submitted by a durable function: keys that its replays make again, so a
            # replay gets the first submission's dispatch ids back.
            calls = [
                call
                if call.idempotency_key is not None
                else dataclasses.replace(call, idempotency_key=run.submission_key())
                for call in calls
            ]
        local = self._local()
        if local is not None:
            # Handed over in memory, a submission is never sent twice: only the caller's
            # own keys are worth the scheduler's lookup and row.
            local_calls = [call._to_proto(local.endpoint_url, self._version) for call in calls]
            own_keys = [call.idempotency_key or "" for call in calls]
            ids: list[str] = await _on_host(_submit_local(local, local_calls, own_keys))
            return ids
        keys = [call.idempotency_key or _random_key() for call in calls]
        endpoint = ""
        if any(call.endpoint is None for call in calls):
            endpoint = self._config.endpoint_url()
        request = dispatch_pb2.DispatchRequest(
            calls=[call._to_proto(endpoint, self._version) for call in calls],
            idempotency_keys=keys,
        )
        api_key = self._config.api_key()
        url = self._config.api_url() + DISPATCH_PATH
        send = self._send(url, api_key, request.SerializeToString(), len(calls))
        if in_durable_function():
            # The session belongs to the host loop, not to the function's durable loop.
            return await run_on_host(send)
        return await send

    async def _send(self, url: str, api_key: str, body: bytes, count: int) -> list[str]:
        payload = await self._post(url, api_key, body, self._timeout, idempotent=True)
        try:
            response = dispatch_pb2.DispatchResponse.FromString(payload)
        except DecodeError as exc:
            raise errors.InvalidResponseError(
                f"the Dispatch API at {url} answered HTTP 200 with a body that is not a "
                f"DispatchResponse ({exc}); check DISPATCH_API_URL"
            ) from None
        ids = list(response.dispatch_ids)
        if len(ids) != count:
            raise errors.InvalidResponseError(
                f"the Dispatch API at {url} returned {len(ids)} dispatch ids for {count} calls"
            )
        return ids

    async def result(self, dispatch_id: str, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - a server-side wait
        """Wait for a call to finish and return its result, or raise its error.

        This uses the inspection service of dispatch_aio's local scheduler
        (``dispatch-aio run`` / ``dispatch-aio server``); other schedulers may not offer it.

        Args:
            dispatch_id: The id returned when the call was submitted.
            timeout: Seconds to wait at most; None waits as long as the call runs.

        Returns:
            The call's return value.

        Raises:
            Exception: The exception the call ended with.
            dispatch_aio.errors.DispatchTimeoutError: The call was still running after
                ``timeout`` seconds.
            dispatch_aio.errors.ClientError: The scheduler answered with an error (for
                example an unknown dispatch id).
        """
        local = self._local()
        if local is not None:
            return await _on_host(_wait_local(local, dispatch_id, timeout))
        wait = self._wait(dispatch_id, timeout)
        if in_durable_function():
            return await run_on_host(wait)
        return await wait

    async def cancel(self, dispatch_id: str) -> bool:
        """Cancel a call and every unfinished call below it.

        Cancelled calls make no further attempts; `result` raises
        `dispatch_aio.errors.CancelledCallError` for them, and a function that awaits
        one receives that error. This uses the control service of dispatch_aio's local
        scheduler; other schedulers may not offer it.

        Args:
            dispatch_id: The id returned when the call was submitted.

        Returns:
            True if the call was cancelled, False if it had finished already (nothing
            changed).

        Raises:
            dispatch_aio.errors.ClientError: The scheduler answered with an error, such
                as ``not_found`` for an unknown dispatch id.
            dispatch_aio.errors.DispatchError: The scheduler could not be reached.
        """
        local = self._local()
        if local is not None:
            cancelled: bool = await _on_host(_cancel_local(local, dispatch_id))
            return cancelled
        cancel = self._cancel(dispatch_id)
        if in_durable_function():
            return await run_on_host(cancel)
        return await cancel

    async def _cancel(self, dispatch_id: str) -> bool:
        api_key = self._config.api_key()
        url = self._config.api_url() + CANCEL_CALL_PATH
        body = control_pb2.CancelCallRequest(dispatch_id=dispatch_id).SerializeToString()
        # Cancelling twice is harmless: safe to retry like a keyed submission.
        payload = await self._post(url, api_key, body, self._timeout, idempotent=True)
        try:
            return control_pb2.CancelCallResponse.FromString(payload).cancelled
        except DecodeError as exc:
            raise errors.InvalidResponseError(
                f"the scheduler at {url} answered with a body that is not a "
                f"CancelCallResponse ({exc})"
            ) from None

    async def send_event(
        self, key: str, value: Any = None, *, error: BaseException | None = None
    ) -> int:
        """Resolve the durable event `key`: every function waiting on it resumes.

        Functions waiting in ``await dispatch_aio.wait_event(key)`` receive `value`, or
        have `error` raised at their await; functions that wait on the key later get it
        at once. An event is resolved once. This uses the control service of
        dispatch_aio's scheduler.

        Args:
            key: The event's key.
            value: The value the waiters receive (encoded like a call's result).
            error: An exception to raise in the waiters instead.

        Returns:
            The number of calls that were waiting and received the event now.

        Raises:
            dispatch_aio.errors.EventAlreadyResolvedError: The key was resolved already.
            dispatch_aio.errors.ClientError: The scheduler refused the event (invalid key;
                ``unimplemented``: it is not dispatch_aio's scheduler).
            dispatch_aio.errors.DispatchError: The scheduler could not be reached.
        """
        if not isinstance(key, str):
            raise TypeError(f"send_event() takes the key as a str, got {type(key).__name__}")
        request = control_pb2.SendEventRequest(key=key)
        if error is not None:
            if value is not None:
                raise ValueError("send_event(): give a value or an error, not both")
            request.error.CopyFrom(encode_error(error))
        else:
            request.value.CopyFrom(encode_value(value, context=f"the value of event {key!r}"))
        local = self._local()
        if local is not None:
            woken: int = await _on_host(_send_event_local(local, request))
            return woken
        send = self._send_event(request)
        if in_durable_function():
            return await run_on_host(send)
        return await send

    async def _send_event(self, request: control_pb2.SendEventRequest) -> int:
        api_key = self._config.api_key()
        url = self._config.api_url() + SEND_EVENT_PATH
        # Not retried after a request that may have arrived: a second one would be
        # refused as already resolved.
        try:
            payload = await self._post(url, api_key, request.SerializeToString(), self._timeout)
        except errors.ClientError as exc:
            raise _event_error(exc, request.key, url) from None
        try:
            return control_pb2.SendEventResponse.FromString(payload).woken
        except DecodeError as exc:
            raise errors.InvalidResponseError(
                f"the scheduler at {url} answered with a body that is not a "
                f"SendEventResponse ({exc})"
            ) from None

    @property
    def schedules(self) -> ScheduleClient:
        """Create, list, pause, resume and delete schedules (see `ScheduleClient`)."""
        return ScheduleClient(self)

    def _optional_endpoint(self) -> str:
        """The client's endpoint URL, or "" when none is configured."""
        try:
            return self._config.endpoint_url()
        except errors.ConfigurationError:
            return ""

    def _local(self) -> EmbeddedAPI | None:
        """The embedded scheduler to use, or None to use the API over HTTP."""
        if self._embedded is None or not self._config.embedded():
            return None
        local = self._embedded()
        if local is None:
            raise errors.ConfigurationError(
                "no scheduler to submit to: DISPATCH_API_URL is not set, so the application "
                "runs its own scheduler, which is not started; submit calls while "
                "`dispatch.run()`, `await dispatch.start()` or an aiohttp application with "
                "`dispatch.cleanup_ctx` runs, or set DISPATCH_API_URL to use a separate "
                "scheduler (`dispatch-aio run -- python app.py` sets it)",
                variable="DISPATCH_API_URL",
            )
        return local

    async def _wait(self, dispatch_id: str, timeout: float | None) -> Any:  # noqa: ASYNC109
        api_key = self._config.api_key()
        url = self._config.api_url() + WAIT_CALL_PATH
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            # Long polls of bounded length, so that a lost connection is noticed.
            chunk = (
                _WAIT_CHUNK
                if deadline is None
                else max(0.0, min(_WAIT_CHUNK, deadline - loop.time()))
            )
            request = inspect_pb2.WaitCallRequest(dispatch_id=dispatch_id)
            request.timeout.FromTimedelta(timedelta(seconds=chunk))
            payload = await self._post(
                url, api_key, request.SerializeToString(), chunk + self._timeout
            )
            try:
                call = inspect_pb2.WaitCallResponse.FromString(payload).call
            except DecodeError as exc:
                raise errors.InvalidResponseError(
                    f"the scheduler at {url} answered with a body that is not a "
                    f"WaitCallResponse ({exc})"
                ) from None
            if call.state == inspect_pb2.CALL_STATE_DONE:
                return _outcome(call)
            if deadline is not None and loop.time() >= deadline:
                raise errors.DispatchTimeoutError(_not_done(call, timeout or 0.0))

    async def _post(
        self,
        url: str,
        api_key: str,
        body: bytes,
        timeout_seconds: float,
        *,
        idempotent: bool = False,
    ) -> bytes:
        """POST a Connect unary binary request; return the body of its 200 answer.

        A request that could not connect is sent again; an `idempotent` one also after
        any other transport failure (reset connection, timeout).
        """
        session = self._get_session()
        headers = {
            "Content-Type": "application/proto",
            "Connect-Protocol-Version": "1",
            "Connect-Timeout-Ms": str(int(timeout_seconds * 1000)),
            "Authorization": f"Bearer {api_key}",
            "User-Agent": f"dispatch-aio/{__version__}",
        }
        timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        attempt = 0
        while True:
            try:
                async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                    payload = await resp.read()
                    status = resp.status
                break
            except aiohttp.ClientSSLError as exc:  # will not go away by itself
                raise _transport_error(url, exc, attempts=attempt + 1) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Not connected: nothing was sent. Otherwise the request may have arrived,
                # and only its idempotency keys make sending it again safe.
                never_sent = isinstance(exc, aiohttp.ClientConnectorError)
                if attempt >= self._retries or not (never_sent or idempotent):
                    raise _failure(url, exc, timeout_seconds, attempt + 1) from exc
                attempt += 1
                delay = _RETRY_DELAY * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                logger.info(
                    "request to the Dispatch API at %s failed (%s); retrying in %.2f s "
                    "(attempt %d of %d)",
                    url,
                    _describe(exc),
                    delay,
                    attempt + 1,
                    self._retries + 1,
                )
                await asyncio.sleep(delay)
        if status != 200:
            raise _client_error(url, status, payload)
        return payload

    def _get_session(self) -> aiohttp.ClientSession:
        if self._external is not None:
            return self._external
        loop = asyncio.get_running_loop()
        if self._session is not None and self._session_loop is not loop:
            assert self._session_loop is not None
            if not self._session_loop.is_closed():
                raise RuntimeError(
                    "this Dispatch client is in use by another running event loop; use one "
                    "client (one Dispatch object) per event loop"
                )
            # Left open by an earlier asyncio.run(): its connections died with that loop.
            self._session.detach()
            self._session = None
        if self._session is None:
            # Pooled keep-alive connections: a request that fails on a stale one is sent
            # again, which its idempotency keys make safe.
            self._session = aiohttp.ClientSession()
            self._session_loop = loop
            self._closer = _close_at_loop_end(self._session)
        return self._session

    async def aclose(self) -> None:
        """Close the client's session (not a session passed in); the client stays usable."""
        session, self._session = self._session, None
        closer, self._closer = self._closer, None
        if session is None:
            return
        if self._session_loop is asyncio.get_running_loop():
            if closer is not None:
                await closer.aclose()  # closes the session
            await session.close()
        else:
            session.detach()


def _close_at_loop_end(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Return a started async generator that closes `session` when it is closed.

    The running loop tracks the generator, and ``asyncio.run()`` closes every generator
    it tracks before it ends: a client left open closes its kept-alive connections
    there, while the loop still runs, instead of leaking them.
    """

    async def close_at_end() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await session.close()

    closer = close_at_end()
    # Run it to its yield now (it does not suspend before), without awaiting.
    with contextlib.suppress(StopIteration):
        closer.asend(None).send(None)
    return closer


def _random_key() -> str:
    return secrets.token_urlsafe(16)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _failure(
    url: str, exc: aiohttp.ClientError | TimeoutError, timeout_seconds: float, attempts: int
) -> errors.DispatchError:
    """The error to raise for the last failed attempt of a request."""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return errors.DispatchTimeoutError(
            f"cannot connect to the Dispatch API at {url} within {timeout_seconds:g} s"
            f"{tries}; nothing was sent; check DISPATCH_API_URL"
        )
    if isinstance(exc, TimeoutError):
        return errors.DispatchTimeoutError(
            f"the Dispatch API at {url} did not answer within {timeout_seconds:g} s{tries}; "
            "check that the API (or the local scheduler) is running and not overloaded"
        )
    return _transport_error(url, exc, attempts=attempts)


def _transport_error(url: str, exc: aiohttp.ClientError, *, attempts: int) -> errors.DispatchError:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    where = f"cannot reach the Dispatch API at {url}{tries}: {exc}"
    fix = "; check DISPATCH_API_URL and that the API (or the local scheduler) is running"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return errors.DNSError(where + fix)
    if isinstance(exc, aiohttp.ClientSSLError):
        return errors.TLSError(where + "; check the API's TLS certificate and DISPATCH_API_URL")
    if isinstance(exc, aiohttp.ClientConnectionError):
        return errors.TCPError(where + fix)
    return errors.HTTPError(f"the request to the Dispatch API at {url} failed: {exc}")


def _client_error(url: str, status: int, payload: bytes) -> errors.ClientError:
    code, message = "", ""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        code = body["code"]
        text = body.get("message")
        message = text if isinstance(text, str) else ""
    else:
        text = payload[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        message = text + ("..." if len(payload) > _MAX_ERROR_TEXT else "")
    hint = "" if status == 413 and message else _hint(status, code, url)
    if hint:
        message = f"{message} ({hint})" if message else hint
    return errors.ClientError(message, http_status=status, code=code)


def _hint(status: int, code: str, url: str) -> str:
    """Say what to fix, unless `errors.ClientError` adds a hint for `code` itself."""
    if code in ("unauthenticated", "permission_denied"):
        return ""
    if status == 401:
        return "the API key was rejected: check DISPATCH_API_KEY (or api_key= of Dispatch())"
    if status == 403:
        return "the API key (DISPATCH_API_KEY) is not allowed to dispatch calls"
    if status == 404 or code in ("not_found", "unimplemented"):
        return f"no Dispatch API answers at {url}: check DISPATCH_API_URL"
    if status == 413:
        return "the request is too large for the Dispatch API: send fewer or smaller calls"
    if status == 429 or code == "resource_exhausted":
        return "the Dispatch API is rate limiting this application: try again later"
    if status == 400 or code in ("invalid_argument", "out_of_range"):
        return "the API rejected the calls: check the function names, inputs and endpoint"
    if status >= 500 or code in ("unavailable", "internal", "unknown"):
        return (
            "the Dispatch API failed: try again later; the calls may or may not have been created"
        )
    return ""


def _outcome(call: inspect_pb2.CallInfo) -> Any:
    """Return the output of a finished call, or raise its error."""
    return _finished(call.dispatch_id, call.function, call.status, call.result)


def _finished(dispatch_id: str, function: str, status: int, result: call_pb2.CallResult) -> Any:
    if result.HasField("error"):
        raise decode_error(result.error)
    if status != status_pb2.STATUS_OK:
        name = status_pb2.Status.Name(status)  # type: ignore[arg-type]
        raise errors.RemoteError(name, f"call {dispatch_id} ({function}) failed")
    return decode_value(result.output) if result.HasField("output") else None


class _FinishedCall(Protocol):
    @property
    def dispatch_id(self) -> str: ...
    @property
    def function(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def result(self) -> call_pb2.CallResult: ...


class EmbeddedAPI(Protocol):
    """What the client needs of a scheduler running in this process."""

    endpoint_url: str
    """The endpoint URL of calls that name none."""

    async def submit(self, calls: list[call_pb2.Call], idempotency_keys: list[str]) -> list[str]:
        """Submit calls atomically, one idempotency key per call; `ValueError` if invalid."""
        ...

    async def wait(self, dispatch_id: str, max_seconds: float | None) -> _FinishedCall | None:
        """Wait for a call to finish; None if it still runs; `LookupError` if unknown."""
        ...

    async def progress(self, dispatch_id: str) -> inspect_pb2.CallInfo | None:
        """What an unfinished call did so far (state, attempts, last error)."""
        ...

    async def cancel(self, dispatch_id: str) -> int | None:
        """Cancel a call tree; None if finished already; `LookupError` if unknown."""
        ...

    async def send_event(self, key: str, result: call_pb2.CallResult) -> int:
        """Resolve an event; `ValueError` if the key is invalid or resolved already."""
        ...

    @property
    def schedules(self) -> Any:
        """The scheduler's `Schedules`."""
        ...


def _event_error(exc: errors.ClientError, key: str, url: str) -> errors.ClientError:
    if exc.code == "already_exists":
        return errors.EventAlreadyResolvedError(exc.message)
    if exc.code == "unimplemented" or exc.http_status == 404:
        return errors.ClientError(
            f"the scheduler at {url} does not offer durable events (no SendEvent RPC): "
            "events need dispatch_aio's scheduler (`dispatch-aio run`, `dispatch-aio "
            "server`, or the one embedded in the application)",
            http_status=exc.http_status,
            code=exc.code,
        )
    return exc


# The `_local` functions below serve a program that runs its scheduler in process: they
# import the scheduler's errors when called, so that other programs never load it.


async def _send_event_local(local: EmbeddedAPI, request: control_pb2.SendEventRequest) -> int:
    from .scheduler._events import EventAlreadyResolvedError
    from .scheduler.store import StoreError

    result = call_pb2.CallResult()
    if request.HasField("error"):
        result.error.CopyFrom(request.error)
    else:
        result.output.CopyFrom(request.value)
    try:
        return await local.send_event(request.key, result)
    except EventAlreadyResolvedError as exc:
        raise errors.EventAlreadyResolvedError(str(exc)) from None
    except ValueError as exc:  # an invalid key
        raise errors.ClientError(str(exc), http_status=400, code="invalid_argument") from None
    except (RuntimeError, StoreError) as exc:  # closing, or the database failed
        raise errors.ClientError(str(exc), http_status=503, code="unavailable") from None


async def _on_host(work: Any) -> Any:
    # The scheduler belongs to the host loop, not to a function's durable loop.
    if in_durable_function():
        return await run_on_host(work)
    return await work


async def _submit_local(
    local: EmbeddedAPI, calls: list[call_pb2.Call], keys: list[str]
) -> list[str]:
    from .scheduler.store import StoreError

    try:
        return await local.submit(calls, keys)
    except ValueError as exc:  # the scheduler's InvalidCallError
        raise errors.ClientError(str(exc), http_status=400, code="invalid_argument") from None
    except (RuntimeError, StoreError) as exc:  # closing, or the database failed
        raise errors.ClientError(str(exc), http_status=503, code="unavailable") from None


def _not_done(call: inspect_pb2.CallInfo, timeout: float) -> str:
    """Why a call waited for has no result yet: it never ran, its attempts fail, or it runs."""
    what = f"call {call.dispatch_id} ({call.function})"
    pending = call.state == inspect_pb2.CALL_STATE_PENDING
    running = call.state == inspect_pb2.CALL_STATE_RUNNING
    if pending and not call.polls and not call.attempts:
        return (
            f"{what} has not run after {timeout:g} s: the scheduler has made no attempt "
            "yet (it is busy, or the call waits for its start time)"
        )
    # A retry may be in flight when the wait ends: the attempts before it still say why.
    failed = call.attempts - 1 if running else call.attempts
    if (pending or running) and not call.polls and call.last_error and failed > 0:
        plural = "s" if failed > 1 else ""
        retry = "another is in flight and it" if running else "it"
        return (
            f"{what} has not run after {timeout:g} s: its {failed} attempt{plural} "
            f"failed, the last one with: {call.last_error}; {retry} is retried until it "
            "expires (is the app running and serving the function?)"
        )
    if call.last_error and pending:
        return (
            f"{what} has not finished after {timeout:g} s: its last attempt failed "
            f"({call.last_error}) and it is retried"
        )
    return f"{what} still runs after {timeout:g} s"


async def _wait_local(local: EmbeddedAPI, dispatch_id: str, timeout: float | None) -> Any:  # noqa: ASYNC109
    try:
        done = await local.wait(dispatch_id, timeout)
    except LookupError as exc:
        raise errors.ClientError(str(exc), http_status=404, code="not_found") from None
    if done is None:
        assert timeout is not None  # without one, the wait lasts until the call is done
        info = await local.progress(dispatch_id)
        message = f"call {dispatch_id} still runs after {timeout:g} s"
        raise errors.DispatchTimeoutError(message if info is None else _not_done(info, timeout))
    return _finished(done.dispatch_id, done.function, done.status, done.result)


async def _cancel_local(local: EmbeddedAPI, dispatch_id: str) -> bool:
    from .scheduler.store import StoreError

    try:
        return await local.cancel(dispatch_id) is not None
    except LookupError as exc:
        raise errors.ClientError(str(exc), http_status=404, code="not_found") from None
    except (RuntimeError, StoreError) as exc:  # closing, or the database failed
        raise errors.ClientError(str(exc), http_status=503, code="unavailable") from None
