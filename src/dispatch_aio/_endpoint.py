"""The function endpoint: the aiohttp handler of ``FunctionService.Run``, and serving it.

A Run request goes through these checks, each answered with a Connect JSON error
(``{"code", "message"}``) when it fails, before any function runs:

==========================================================  ======  ===================
Problem                                                     HTTP    Connect code
==========================================================  ======  ===================
``Content-Encoding`` other than identity                    415     invalid_argument
``Content-Type`` other than application/proto,              415     invalid_argument
application/octet-stream or none
no ``Content-Length`` (e.g. a chunked body)                 411     invalid_argument
``Content-Length`` over the body limit (see below)          413     invalid_argument
body shorter than its ``Content-Length``                    400     invalid_argument
body not received within the body timeout                   408     deadline_exceeded
signature missing or malformed (when a key is set)          401     unauthenticated
signature invalid, stale or for another body                403     permission_denied
signature already accepted once (a replayed request)        403     permission_denied
no key set, and the peer is not on this machine             403     permission_denied
body is not a ``RunRequest``; no function name              400     invalid_argument
function not registered                                     404     not_found
==========================================================  ======  ===================

Without a verification key, only peers on this machine (loopback addresses) are served,
however the endpoint is mounted, unless insecure mode is on.

The body limit is `max_body_size` (the protocol's 16 MB). A request larger than that
is read only if a verification key is set and its signature, checked before the body
is read, is valid: its signer is trusted with up to `max_signed_body_size` (1 GB). A
resume that carries a whole journal (after a restart of the app, on another replica)
holds every result the call received, so a call may keep more than 16 MB of results.

Beside it, ``POST .../dispatch_aio.v1.FunctionService/RunBatch`` takes several Run
requests in one exchange from a scheduler of this SDK (see ``RunBatch`` in batch.proto):
the batch is checked as one request is, then each item is answered as it would be alone,
streamed as soon as its run ends. Run responses announce the route with the header
``Dispatch-Aio-Batch: 1``. An item may carry the resume of its caller (``then``): when
the item's run returns and the caller's run is held here awaiting that call alone, the
caller is resumed with the result at once, and its answer follows in the same stream:
a chain of ``await f(x)`` costs one exchange a step instead of two.

A scheduler of this SDK announces the journal extension with the header
``Dispatch-Aio-Journal: delta``: Polls then carry only what is new in the journal,
and resumes name it by reference (see ``JournalDelta`` in journal.proto). The
header is not covered by the signature; forging it cannot run anything, and a
scheduler that does not keep the deltas sends them back, which restarts the call
(INCOMPATIBLE_STATE).

Everything after that is answered with a ``RunResponse`` (HTTP 200, application/proto)
whose status classifies the outcome. Nothing a request contains leads to a 500; only a
misconfigured endpoint (an invalid verification key, when it was not checked at startup)
answers 500 ``internal``.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_SIGNED_BODY_SIZE",
    "RUN_PATH",
    "Endpoint",
    "EndpointServer",
    "Incoming",
    "Reply",
    "body_too_large",
    "is_loopback",
]

import asyncio
import dataclasses
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

from aiohttp import web
from google.protobuf.message import DecodeError

from ._batch import BATCH_HEADER, BATCH_TYPE, frame
from ._codec import encode_error
from ._config import INSECURE, VERIFICATION_KEY, Config
from ._logs import ATTEMPT, ATTEMPT_HEADER
from ._policy import apply_policy
from ._reserved import WAIT_EVENT
from ._signature import (
    InvalidSignatureError,
    MalformedSignatureError,
    ReplayGuard,
    SignatureError,
    load_public_key,
    public_key_to_base64,
    verify_headers,
    verify_request,
)
from ._status import Status
from ._telemetry import run_span
from .durable import Runner
from .durable._journal import CANCEL_HEADER, JOURNAL_HEADER
from .errors import ConfigurationError, PermanentError
from .proto.sdk.v1 import call_pb2, exit_pb2, function_pb2, status_pb2
from .proto.v1 import batch_pb2

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

logger = logging.getLogger(__name__)

RUN_PATH = "/dispatch.sdk.v1.FunctionService/Run"
DEFAULT_MAX_BODY_SIZE = 16_000_000
"""The protocol's limit on Run request bodies, in bytes."""
DEFAULT_MAX_SIGNED_BODY_SIZE = 1_000_000_000
"""The limit on the body of a Run request whose signature checked out, in bytes."""
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client may take to send a request body."""

_ACCEPTED_TYPES = frozenset({"application/proto", "application/octet-stream"})
_MAX_LISTED = 20


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to bind) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def body_too_large(length: int, limit: int, *, signed: bool = True) -> str:
    """Say why a Run request of `length` bytes is refused, and what to do about it.

    `signed` says whether `limit` is that of signed requests; else it is that of
    requests whose signature was not checked (none, or none set to check it with).
    """
    if signed:
        which, raise_it = "", "max_signed_body_size"
    else:
        which = " for requests whose signature is not checked"
        raise_it = "max_body_size, or set the verification key (signed requests may be larger)"
    return (
        f"the request body of {length} bytes exceeds the limit of {limit} bytes{which}: a "
        "resume carries the results the function has not consumed yet and, when the "
        "endpoint does not hold the run live (after a restart, on another replica), its "
        "whole journal, every earlier result included; return large data by reference (a "
        f"URL, a key in a store) rather than by value, or raise the endpoint's {raise_it}"
    )


@dataclass(frozen=True, slots=True)
class Incoming:
    """A Run request as any HTTP server sees it (aiohttp, ASGI ...)."""

    method: str
    url: str
    """The absolute URL the client addressed (the signature covers its path and host)."""
    headers: Mapping[str, str]
    """Case-insensitive; repeated fields joined with ", " (a multidict does both)."""
    remote: str | None
    """The peer's address; empty or a path for a Unix socket; None if unknown."""
    read: Callable[[int], Awaitable[bytes]]
    """Reads exactly that many bytes of the body, raising `asyncio.IncompleteReadError`
    when the body ends before."""

    @property
    def content_length(self) -> int | None:
        """The Content-Length, or None if absent or not a number."""
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit():
            return None
        return int(raw)


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a Run request, for the server to send."""

    status: int
    body: bytes
    content_type: str
    close: bool = False
    """Close the connection instead of reading the rest of an unwanted body."""
    headers: tuple[tuple[str, str], ...] = ()
    """More response headers, for the server to send as they are."""


_PROTO = "application/proto"
# On every answer of the Run route: both servers serve the batch route beside it. Where
# the Run route is mounted alone, the scheduler's first batch gets 404 and it sends no more.
_ANNOUNCE_BATCH = ((BATCH_HEADER, "1"),)


def _error(status: int, code: str, message: str, *, unread: bool = False) -> Reply:
    # Close rather than drain a body that is not wanted (it may be huge or endless).
    body = json.dumps({"code": code, "message": message}).encode()
    return Reply(status, body, "application/json", close=unread)


class Endpoint:
    """Serves ``FunctionService.Run`` for the functions of one `Dispatch` object.

    Args:
        config: Where the verification key and insecure mode are read.
        functions: The registered functions by name (a live view).
        runner: Returns the runner that executes requests.
        max_body_size: Largest accepted request body, in bytes.
        max_signed_body_size: Largest accepted body of a request whose signature
            checked out before it was read, in bytes (see the module docstring).
        body_timeout: Seconds a client may take to send the body.
    """

    def __init__(
        self,
        config: Config,
        functions: Mapping[str, Any],
        runner: Callable[[], Runner],
        *,
        max_body_size: int,
        max_signed_body_size: int = DEFAULT_MAX_SIGNED_BODY_SIZE,
        body_timeout: float,
    ) -> None:
        if max_body_size <= 0:
            raise ValueError(f"max_body_size must be positive, got {max_body_size!r}")
        if max_signed_body_size <= 0:
            raise ValueError(f"max_signed_body_size must be positive, got {max_signed_body_size!r}")
        if body_timeout <= 0:
            raise ValueError(f"body_timeout must be positive, got {body_timeout!r}")
        self._config = config
        self._functions = functions
        self._runner = runner
        self._max_body_size = max_body_size
        self._max_signed_body_size = max(max_signed_body_size, max_body_size)
        self._body_timeout = body_timeout
        self._prepared = False
        self._key: Ed25519PublicKey | None = None
        self._insecure = False
        self._replays = ReplayGuard()

    def prepare(self) -> None:
        """Load the verification key (once until `reset`), warning if there is none.

        Raises:
            ConfigurationError: The verification key is empty or not an Ed25519 key.
        """
        if self._prepared:
            return
        self._insecure = self._config.insecure()
        raw = self._config.verification_key()
        if raw is None:
            self._key = None
            if not self._bridged():
                logger.warning(
                    "request signature verification is disabled because "
                    "%s is not set: anyone who can reach this endpoint can run its functions",
                    VERIFICATION_KEY,
                )
        else:
            try:
                self._key = load_public_key(raw)
            except ValueError as exc:
                raise ConfigurationError(
                    f"invalid verification key {raw[:80]!r} ({VERIFICATION_KEY} or "
                    f"verification_key=): {exc}",
                    variable=VERIFICATION_KEY,
                    value=raw,
                ) from None
            logger.info("verifying request signatures with key %s", public_key_to_base64(self._key))
        self._prepared = True

    def _bridged(self) -> bool:
        # Requests relayed by a bridge are authenticated by the API key and have their
        # Host rewritten, so they cannot carry a usable signature.
        try:
            return self._config.endpoint_url().startswith("bridge://")
        except ConfigurationError:
            return False

    def reset(self) -> None:
        """Forget the loaded key, so that the next start reads the configuration again."""
        self._prepared = False
        self._key = None

    def check_bind(self, host: str, port: int) -> None:
        """Refuse to serve on a non-loopback address without a verification key.

        Raises:
            ConfigurationError: No key is set, `host` is not a loopback address and
                insecure mode is off; or the key is invalid.
        """
        self.prepare()
        if self._key is not None or is_loopback(host) or self._config.insecure():
            return
        raise ConfigurationError(
            f"refusing to serve on {host}:{port} without request signature verification: "
            "anyone who can reach that address could run your functions. Set "
            f"{VERIFICATION_KEY} to the scheduler's public key, serve on a loopback "
            f"address (e.g. DISPATCH_ENDPOINT_ADDR=127.0.0.1:{port}), or set {INSECURE}=1 "
            "(or insecure=True) to allow it",
            variable=VERIFICATION_KEY,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Handle ``POST .../dispatch.sdk.v1.FunctionService/Run`` (aiohttp)."""
        return _http_response(await self.respond(_incoming(request)))

    async def handle_batch(self, request: web.Request) -> web.StreamResponse:
        """Handle ``POST .../dispatch_aio.v1.FunctionService/RunBatch`` (aiohttp)."""
        answers = await self.respond_batch(_incoming(request))
        if isinstance(answers, Reply):
            return _http_response(answers)
        response = web.StreamResponse()
        response.content_type = BATCH_TYPE
        await response.prepare(request)
        connected = True
        async for data, more in answers:
            if connected:
                try:
                    # The last answers go with the stream's end, in one write.
                    await (response.write(data) if more else response.write_eof(data))
                except ConnectionError:
                    connected = False  # see respond_batch: the runs go on
        return response

    async def respond_batch(self, request: Incoming) -> Reply | AsyncIterator[tuple[bytes, bool]]:
        """Check a RunBatch request, then run its items; the refusal, or the answers.

        The batch is checked as a Run request is (headers, size, signature). Its items
        then run concurrently, and the iterator yields the framed answers as their runs
        end (those ready together in one chunk), each chunk with whether more follow. A
        server whose client went away keeps iterating without sending: the runs go on
        to their end (the scheduler sends again what it got no answer for), only their
        answers are lost.
        """
        body = await self._admit(request)
        if isinstance(body, Reply):
            return body
        try:
            batch = batch_pb2.RunBatch.FromString(body)
        except Exception as exc:
            return _error(400, "invalid_argument", f"the request body is not a RunBatch ({exc})")
        return self._batch_answers(batch)

    async def _batch_answers(self, batch: batch_pb2.RunBatch) -> AsyncIterator[tuple[bytes, bool]]:
        # Tasks of their own: a client that goes away does not tear the runs.
        pending: dict[asyncio.Future[Reply], int] = {
            asyncio.ensure_future(self._answer_item(item)): i for i, item in enumerate(batch.items)
        }
        resumes: dict[asyncio.Future[Reply], int] = {}  # items' `then` runs
        if not pending:
            yield b"", False
        while pending or resumes:
            done, _ = await asyncio.wait([*pending, *resumes], return_when=asyncio.FIRST_COMPLETED)
            answers = []
            for task in done:
                if task in resumes:
                    answers.append(self._batch_answer(task, resumes.pop(task), then=True))
                    continue
                index = pending.pop(task)
                answer = self._batch_answer(task, index)
                answers.append(answer)
                resume = self._then(batch.items[index], answer)
                if resume is not None:
                    resumes[asyncio.ensure_future(resume)] = index
                elif batch.items[index].then:
                    answers.append(batch_pb2.BatchAnswer(index=index, then=True))  # not run
            yield b"".join(map(frame, answers)), bool(pending or resumes)

    def _then(
        self, item: batch_pb2.BatchItem, answer: batch_pb2.BatchAnswer
    ) -> Coroutine[Any, Any, Reply] | None:
        """The run of the item's `then` resume, if its request's answer lets it go."""
        if not item.then or answer.status != 200 or answer.content_type != _PROTO:
            return None
        response = function_pb2.RunResponse.FromString(answer.body)
        if (
            response.status != status_pb2.STATUS_OK
            or response.WhichOneof("directive") != "exit"
            or response.exit.HasField("tail_call")
        ):
            return None
        try:
            resume = function_pb2.RunRequest.FromString(item.then)
            child = function_pb2.RunRequest.FromString(item.request)
        except DecodeError:
            return None
        if resume.function not in self._functions or not self._runner().awaits_only(
            resume, item.then_correlation_id
        ):
            return None  # a resume that would replay: the scheduler sends it alone
        # The result as the scheduler records it (see BatchItem.then).
        result = resume.poll_result.results.add()
        result.CopyFrom(response.exit.result)
        result.correlation_id = item.then_correlation_id
        result.dispatch_id = child.dispatch_id
        return self._answer(
            resume.SerializeToString(), item.journal_delta, False, item.then_attempt
        )

    async def _answer_item(self, item: batch_pb2.BatchItem) -> Reply:
        return await self._answer(item.request, item.journal_delta, item.cancel, item.attempt)

    @staticmethod
    def _batch_answer(
        task: asyncio.Future[Reply], index: int, *, then: bool = False
    ) -> batch_pb2.BatchAnswer:
        try:
            reply = task.result()
        except Exception as exc:  # a bug: said as the request alone would have got it
            logger.error("cannot answer a Run request of a batch", exc_info=exc)
            reply = _error(500, "internal", f"the endpoint failed: {exc!r}")
        return batch_pb2.BatchAnswer(
            index=index,
            status=reply.status,
            body=reply.body,
            content_type=reply.content_type,
            then=then,
        )

    async def respond(self, request: Incoming) -> Reply:
        """Check and run a Run request; return the answer (see the module docstring).

        Every answer announces the batch route (``Dispatch-Aio-Batch: 1``).
        """
        body = await self._admit(request)
        if isinstance(body, Reply):
            return dataclasses.replace(body, headers=_ANNOUNCE_BATCH)
        attempt = request.headers.get(ATTEMPT_HEADER, "").strip()
        reply = await self._answer(
            body,
            request.headers.get(JOURNAL_HEADER, "").strip().lower() == "delta",
            request.headers.get(CANCEL_HEADER, "").strip() == "1",
            int(attempt) if attempt.isdigit() else 0,
        )
        return dataclasses.replace(reply, headers=_ANNOUNCE_BATCH)

    async def _admit(self, request: Incoming) -> bytes | Reply:
        """Check a request's headers, read its body and verify it: the body, or the refusal."""
        try:
            self.prepare()
        except ConfigurationError as exc:
            logger.error("cannot serve a Run request: %s", exc)
            return _error(500, "internal", f"the endpoint is misconfigured: {exc}", unread=True)
        rejected = self._check_headers(request)
        if rejected is not None:
            return rejected
        length = request.content_length
        assert length is not None  # checked above
        try:
            async with asyncio.timeout(self._body_timeout):
                # aiohttp's reader of an empty body refuses even a read of 0 bytes.
                body = await request.read(length) if length else b""
        except asyncio.IncompleteReadError as exc:
            return _error(
                400,
                "invalid_argument",
                f"the request body ended after {len(exc.partial)} of the {length} bytes "
                "announced by Content-Length",
            )
        except TimeoutError:
            return _error(
                408,
                "deadline_exceeded",
                f"the request body was not received within {self._body_timeout:g} s",
                unread=True,
            )
        except Exception as exc:  # a broken connection: the answer may never arrive
            return _error(
                400, "invalid_argument", f"cannot read the request body: {exc}", unread=True
            )
        if self._key is not None:
            rejected = self._verify(request, body, self._key)
            if rejected is not None:
                return rejected
        elif not self._insecure and not _from_loopback(request):
            # Mounted into an app that listens on every interface, `check_bind` never ran.
            logger.warning("refused an unsigned Run request from %s", request.remote)
            return _error(
                403,
                "permission_denied",
                f"unsigned Run requests are only served from this machine, and this one came "
                f"from {request.remote}: set {VERIFICATION_KEY} to the scheduler's public key "
                f"so that signed requests are verified, or set {INSECURE}=1 (insecure=True) to "
                "serve unsigned requests from anywhere",
            )
        return body

    async def _answer(self, body: bytes, delta: bool, cancel: bool, attempt: int) -> Reply:
        """Run a verified request body; the flags are those its headers carry."""
        try:
            run_request = function_pb2.RunRequest.FromString(body)
        except Exception as exc:
            return _error(
                400,
                "invalid_argument",
                f"the request body is not a binary protobuf RunRequest ({exc})",
            )
        name = run_request.function
        if not name:
            return _error(400, "invalid_argument", "the RunRequest has no function name")
        if name == WAIT_EVENT:
            return Reply(200, _events_unsupported().SerializeToString(), _PROTO)
        if name not in self._functions:
            return _error(404, "not_found", self._not_found(name))
        logger.debug(
            "running %s (dispatch id %r, %s)",
            name,
            run_request.dispatch_id,
            run_request.WhichOneof("directive") or "no directive",
        )
        # Set in this request's own task: it names the attempt in the run's log records.
        ATTEMPT.set(attempt)
        response = await self._run(run_request, delta, cancel)
        return Reply(200, response.SerializeToString(), _PROTO)

    async def run_in_process(
        self, request: function_pb2.RunRequest, journal_delta: bool, cancel: bool = False
    ) -> function_pb2.RunResponse:
        """Run a request handed over in memory by a scheduler in this process.

        Nothing is checked but the function's name: the request never left the process.
        The flags are those the headers carry over HTTP (see `Runner.run`).

        Raises:
            LookupError: The function is not registered (the message says so).
        """
        if request.function not in self._functions:
            raise LookupError(self._not_found(request.function))
        return await self._run(request, journal_delta, cancel)

    async def _run(
        self, request: function_pb2.RunRequest, journal_delta: bool, cancel: bool
    ) -> function_pb2.RunResponse:
        with run_span(request, ATTEMPT.get()) as span:
            if cancel:
                response = await self._runner().run(
                    request, journal_delta=journal_delta, cancel=True
                )
            else:
                response = await self._runner().run(request, journal_delta=journal_delta)
            span.answered(response)
        self._add_policies(response)
        return response

    def _add_policies(self, response: function_pb2.RunResponse) -> None:
        """Give the calls a run makes to this application's functions their policies."""
        directive = response.WhichOneof("directive")
        if directive == "poll":
            calls: list[call_pb2.Call] = list(response.poll.calls)
        elif directive == "exit" and response.exit.HasField("tail_call"):
            calls = [response.exit.tail_call]
        else:
            return
        for call in calls:
            function = self._functions.get(call.function)
            if function is not None and not call.endpoint and not call.HasField("policy"):
                apply_policy(call, function.policy)

    def _check_headers(self, request: Incoming) -> Reply | None:
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            return _error(
                415,
                "invalid_argument",
                f"Content-Encoding {encoding!r} is not supported: send the body uncompressed",
                unread=True,
            )
        content_type = request.headers.get("Content-Type")
        if content_type is not None:
            mime = content_type.partition(";")[0].strip().lower()
            if mime not in _ACCEPTED_TYPES:
                return _error(
                    415,
                    "invalid_argument",
                    f"Content-Type {content_type[:100]!r} is not supported: send a binary "
                    "protobuf RunRequest as application/proto",
                    unread=True,
                )
        length = request.content_length
        if length is None:
            return _error(
                411,
                "invalid_argument",
                "Content-Length is required (chunked request bodies are not accepted)",
                unread=True,
            )
        if length > self._max_body_size:
            return self._check_large(request, length)
        return None

    def _check_large(self, request: Incoming, length: int) -> Reply | None:
        """Admit a body over `max_body_size` only from a signer whose signature checks out."""
        key = self._key
        if key is None:
            reason = body_too_large(length, self._max_body_size, signed=False)
        elif length > self._max_signed_body_size:
            reason = body_too_large(length, self._max_signed_body_size)
        else:
            try:
                verify_headers(key, request.method, request.url, request.headers)
            except SignatureError as exc:
                logger.warning("refused a Run request of %d bytes: %s", length, exc)
                reason = (
                    f"the request body of {length} bytes exceeds the limit of "
                    f"{self._max_body_size} bytes, and its signature, which would allow up "
                    f"to {self._max_signed_body_size}, does not check out: {exc}"
                )
            else:
                return None  # the body is checked against the signed digest once read
        return _error(413, "invalid_argument", reason, unread=True)

    def _verify(self, request: Incoming, body: bytes, key: Ed25519PublicKey) -> Reply | None:
        try:
            verified = verify_request(key, request.method, request.url, request.headers, body)
            self._replays.admit(verified)
        except InvalidSignatureError as exc:
            logger.warning("rejected a Run request with an invalid signature: %s", exc)
            return _error(403, "permission_denied", f"invalid request signature: {exc}")
        except (MalformedSignatureError, ValueError) as exc:
            logger.warning("rejected a Run request without a valid signature: %s", exc)
            return _error(401, "unauthenticated", f"missing or malformed signature: {exc}")
        return None

    def _not_found(self, name: str) -> str:
        names = sorted(self._functions)
        listed = ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
        return (
            f"function {name[:200]!r} is not registered with the Dispatch object serving this "
            f"endpoint (registered: {listed or 'none'}); if the app has several Dispatch "
            "objects, register it with the one that runs (@dispatch.function)"
        )


def _events_unsupported() -> function_pb2.RunResponse:
    """The answer to a Run request for an event wait: its scheduler cannot resolve events.

    dispatch_aio's scheduler answers event waits itself; one that sends them to the
    endpoint as ordinary calls does not know durable events.
    """
    error = PermanentError(
        "wait_event() needs dispatch_aio's scheduler: the scheduler that runs this "
        f"application sent the wait to the endpoint as an ordinary call to {WAIT_EVENT!r}, "
        "so it does not know durable events; run the application with dispatch_aio's "
        "scheduler (embedded, `dispatch-aio run` or `dispatch-aio server`)"
    )
    result = call_pb2.CallResult(error=encode_error(error))
    return function_pb2.RunResponse(
        status=status_pb2.Status.ValueType(Status.PERMANENT_ERROR),
        exit=exit_pb2.Exit(result=result),
    )


def _incoming(request: web.Request) -> Incoming:
    # The URL as the client addressed it: behind a proxy, the Host header must be the
    # one that was signed.
    url = f"{request.scheme}://{request.host}{request.rel_url.raw_path_qs}"
    return Incoming(
        request.method, url, request.headers, request.remote, request.content.readexactly
    )


def _http_response(reply: Reply) -> web.Response:
    response = web.Response(
        status=reply.status, body=reply.body, content_type=reply.content_type, headers=reply.headers
    )
    if reply.close:
        response.force_close()
    return response


def _from_loopback(request: Incoming) -> bool:
    remote = request.remote
    if remote is None:
        return False
    if remote == "" or remote.startswith("/"):  # a Unix socket: this machine
        return True
    try:
        return ipaddress.ip_address(remote.partition("%")[0]).is_loopback
    except ValueError:
        return False


class EndpointServer:
    """A running application, as returned by `Dispatch.start`.

    Either its endpoint served over HTTP, or its embedded scheduler running its
    functions in this process.

    Use it as an async context manager, or call `aclose` to stop it.
    """

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, host: str) -> None:
        self._runner: web.AppRunner | None = runner
        self._site = site
        self._host = host
        self._port = 0
        self._scheduler: _EmbeddedInfo | None = None
        self._closer: Callable[[], Awaitable[None]] | None = None
        self._closed = False

    @classmethod
    def embedded(
        cls,
        scheduler: _EmbeddedInfo,
        host: str,
        port: int,
        closer: Callable[[], Awaitable[None]],
    ) -> EndpointServer:
        """The server of an application that runs its own scheduler (nothing listens)."""
        server = cls.__new__(cls)
        server._runner = None
        server._host = host
        server._port = port
        server._scheduler = scheduler
        server._closer = closer
        server._closed = False
        return server

    @property
    def host(self) -> str:
        """The address the endpoint is bound to (or would be, with a separate scheduler)."""
        return self._host

    @property
    def port(self) -> int:
        """The port the endpoint listens on (the chosen one when 0 was asked for)."""
        return self._site.port if self._runner is not None else self._port

    @property
    def url(self) -> str:
        """The base URL of the endpoint, e.g. ``http://127.0.0.1:8000``.

        With the embedded scheduler, the URL its calls name; they are run in memory.
        """
        if self._scheduler is not None:
            return self._scheduler.endpoint_url
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def is_embedded(self) -> bool:
        """Whether the functions run with the scheduler embedded in this process."""
        return self._scheduler is not None

    @property
    def api_url(self) -> str | None:
        """The embedded scheduler's API URL (DISPATCH_API_URL for other programs), if any."""
        return None if self._scheduler is None else self._scheduler.api_url

    @property
    def ui_url(self) -> str | None:
        """The embedded scheduler's web UI, signed in with its API key, if any."""
        return None if self._scheduler is None else self._scheduler.ui_url

    @property
    def database(self) -> str | None:
        """The embedded scheduler's database file, if any."""
        return None if self._scheduler is None else self._scheduler.database

    async def aclose(self) -> None:
        """Stop accepting connections, let in-flight runs finish, then release resources.

        Runs still going after the Dispatch object's shutdown timeout are cancelled.
        With the embedded scheduler, runs in flight are stopped; their calls stay in the
        database and go on when the application starts again. Closing again does
        nothing.
        """
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            await self._runner.cleanup()
        elif self._closer is not None:
            await self._closer()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        if self._scheduler is not None:
            return f"<EndpointServer {self.url} (embedded scheduler, {self.database})>"
        return f"<EndpointServer {self.url}>"


class _EmbeddedInfo(Protocol):
    endpoint_url: str
    api_url: str | None
    ui_url: str | None
    database: str
