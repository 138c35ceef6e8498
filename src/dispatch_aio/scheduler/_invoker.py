"""Signed Run requests to function endpoints, with adaptive concurrency per endpoint.

The invoker makes one attempt and reports what happened as an `Outcome`; deciding
whether to retry is the engine's job. Each endpoint has its own concurrency window
(AIMD): it grows by one slot per success until the first sign of overload (slow
start), then by about one slot per window's worth of successes, and it halves on
THROTTLED, HTTP 429/503, timeouts and connection errors, at most once per window.

An endpoint that stays unreachable (connection, DNS or TLS errors, no response in time)
for `unreachable_warning` seconds gets one warning line, and one more when it answers
again, so that an outage shows at the default log level without a line per attempt.

An endpoint may be served by several replicas (processes of one application, each at
its own URL). The attempts of a call go to the replica that rendezvous hashing of its
dispatch id ranks first, so that its resumes find the run still live in that replica's
memory, whichever scheduler process sends them; a replica that cannot be connected to,
or that signals overload, is passed over for `replica_backoff` seconds, and the call
goes to the next in its ranking (which replays it from the journal). A request that
could not be sent at all moves to the next replica at once, in the same attempt.

Endpoints served by the scheduler's own process (the scheduler embedded in an
application) are given as `LocalHandler`s: their Run requests are handed over in
memory, with no HTTP, signature or size limit, but with the same window, time limit and
outcomes as over HTTP.

An endpoint of this SDK announces the batch route (``Dispatch-Aio-Batch: 1`` on its Run
responses). From then on, the Run requests of an event-loop iteration to that endpoint
(each still holding its own window slot) leave in one signed ``RunBatch`` exchange, whose
answers stream back as the runs end; a request larger than `_BATCH_ITEM_MAX`, or alone
in its iteration, goes as a plain Run request. A batch answered 404 or 405 (the route is
no longer mounted) was not run: its requests go alone, and so do later ones to that
endpoint, until the scheduler restarts.

A request may carry the resume of its caller (`Resume`, sent as ``BatchItem.then``, in
a batch even alone): the endpoint runs it right after the request's run when that run
returns and the caller awaits nothing else, and its answer comes in the same stream
(`Outcome.resumed`). The engine takes it in place of sending that very resume.

A resume that cancels a call (see `Invoker.run`) carries the ``Dispatch-Aio-Cancel``
header (a flag for local handlers), which endpoints of other SDKs ignore.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import aiohttp
from google.protobuf.message import DecodeError

from .. import __version__
from .._batch import BATCH_HEADER, BATCH_PATH, BATCH_TYPE, FRAME_HEADER, frame_length
from .._logs import ATTEMPT, ATTEMPT_HEADER
from .._signature import RequestSigner
from .._status import Status, status_for_http
from ..durable._journal import CANCEL_HEADER, JOURNAL_HEADER
from ..proto.sdk.v1 import function_pb2
from ..proto.v1 import batch_pb2
from ._attempts import connection_failure

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "CANCEL_HEADER",
    "JOURNAL_HEADER",
    "RUN_PATH",
    "Invoker",
    "LocalHandler",
    "Outcome",
    "Resume",
    "run_url",
]

logger = logging.getLogger("dispatch_aio.scheduler")

RUN_PATH = "/dispatch.sdk.v1.FunctionService/Run"
_PROTO = "application/proto"
_HEADERS = MappingProxyType({"Content-Type": _PROTO})
# The journal extension, and the resume of a call being cancelled, for endpoints of
# this SDK (the headers are defined beside the endpoint's side of them).
_DELTA_HEADERS = MappingProxyType({JOURNAL_HEADER: "delta"})
_CANCEL_HEADERS = MappingProxyType({CANCEL_HEADER: "1"})
_OVERLOAD_HTTP = frozenset({429, 503})
_UNREACHABLE = frozenset({Status.TCP_ERROR, Status.DNS_ERROR, Status.TLS_ERROR, Status.TIMEOUT})
_BODY_EXCERPT = 300
# A batch holds at most this many requests and bytes; a larger request goes alone.
_BATCH_ITEMS = 64
_BATCH_BYTES = 1_000_000
_BATCH_ITEM_MAX = 64_000

LocalHandler = Callable[[function_pb2.RunRequest, bool, bool], Awaitable[function_pb2.RunResponse]]
"""Runs a request in this process; the flags announce the journal extension and mark the
resume of a call being cancelled (as the headers do over HTTP). It raises
`LookupError` (with the message to report) for a function it does not serve."""


def run_url(endpoint: str, path: str = RUN_PATH) -> str:
    """Return the URL of FunctionService.Run (or another `path`) under an endpoint URL."""
    return endpoint.rstrip("/") + path


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one Run attempt produced."""

    status: Status
    """The RunResponse's status, or the status of the HTTP or network failure."""
    response: function_pb2.RunResponse | None = None
    """The RunResponse, when the endpoint answered one."""
    error: str = ""
    """What went wrong when there is no RunResponse (names the HTTP code or error)."""
    http_status: int = 0
    """The HTTP status code, when the endpoint answered at all."""
    unsent: bool = False
    """The request provably never reached the endpoint (no connection was made)."""
    resumed: asyncio.Future[Outcome | None] | None = None
    """With a `Resume` sent along: its answer, to come; None if it was not run (or its
    answer was lost)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """The resume of a request's caller, sent with the request (``BatchItem.then``)."""

    request: bytes
    """The serialized RunRequest of the resume, without results."""
    correlation_id: int
    """The request's call in its caller: its result is the resume's."""
    attempt: int
    """The resume's attempt number."""
    time_limit: float
    """Seconds the resume's run may take, after the request's."""


class _Window:
    """AIMD concurrency limit of one endpoint."""

    __slots__ = (
        "ceiling",
        "down_since",
        "epoch",
        "inflight",
        "limit",
        "slow_start",
        "waiters",
        "warned",
    )

    def __init__(self, initial: int, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = float(min(initial, ceiling))
        self.inflight = 0
        self.epoch = 0
        self.slow_start = True
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.down_since: float | None = None  # monotonic time of the first failure in a row
        self.warned = False

    async def acquire(self) -> int:
        if self.inflight < int(self.limit) and not self.waiters:
            self.inflight += 1
            return self.epoch
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.inflight -= 1  # the slot was handed over: pass it on
                self._wake()
            elif waiter in self.waiters:  # `_wake` may have dropped it already
                self.waiters.remove(waiter)
            raise
        return self.epoch

    def release(self, epoch: int, *, success: bool, overload: bool) -> None:
        self.inflight -= 1
        if overload:
            # One decrease per window: only requests sent since the last decrease count.
            if epoch == self.epoch:
                self.limit = max(1.0, self.limit / 2)
                self.epoch += 1
                self.slow_start = False
        elif success:
            step = 1.0 if self.slow_start else 1.0 / self.limit
            self.limit = min(float(self.ceiling), self.limit + step)
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self.inflight < int(self.limit):
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)


class Invoker:
    """Sends signed RunRequests to endpoints.

    Args:
        key: The scheduler's Ed25519 signing key, or what returns it: called when a
            request first goes over HTTP (runs handed over in process are not signed).
        max_concurrency: Ceiling of in-flight requests per endpoint.
        initial_concurrency: Starting window per endpoint.
        unreachable_warning: Seconds an endpoint may be unreachable before a warning.
        local: Endpoints served in this process, by URL, and their handlers.
        replicas: Endpoints served by several processes: the endpoint URL (as calls
            name it) and the URLs of its replicas.
        replica_backoff: Seconds a replica that could not be reached or signalled
            overload is passed over.
    """

    def __init__(
        self,
        key: Ed25519PrivateKey | Callable[[], Ed25519PrivateKey],
        *,
        max_concurrency: int = 256,
        initial_concurrency: int = 8,
        unreachable_warning: float = 10.0,
        local: Mapping[str, LocalHandler] | None = None,
        replicas: Mapping[str, Sequence[str]] | None = None,
        replica_backoff: float = 5.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._key = key
        self._ceiling = max_concurrency
        self._initial = max(1, initial_concurrency)
        self._unreachable_warning = unreachable_warning
        self._windows: dict[str, _Window] = {}
        self._signers: dict[str, RequestSigner] = {}  # by URL
        self._session: aiohttp.ClientSession | None = None
        self._local = MappingProxyType(dict(local or {}))
        self._replicas = MappingProxyType(
            {endpoint: tuple(urls) for endpoint, urls in (replicas or {}).items() if urls}
        )
        self._replica_backoff = replica_backoff
        self._passed_over: dict[str, float] = {}  # replica URL -> monotonic time
        self._local_tasks: set[asyncio.Task[function_pb2.RunResponse]] = set()
        self._batching: set[str] = set()  # endpoints that announced the batch route
        self._batch_refused: set[str] = set()  # endpoints that answered a batch 404/405
        self._batches: dict[str, _Batch] = {}  # by endpoint: the batch leaving next
        self._batch_tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Create the HTTP client session (inside the running loop)."""
        self._session = aiohttp.ClientSession(
            # Concurrency is limited per endpoint by the windows, not by the connector.
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"dispatch-aio-scheduler/{__version__}"},
        )

    async def close(self) -> None:
        """Close the HTTP client session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        for task in list(self._local_tasks):  # runs given up on after their time limit
            task.cancel()
        for batch_task in list(self._batch_tasks):
            batch_task.cancel()

    def takes_resumes(self, endpoint: str) -> bool:
        """Whether a `Resume` may go with requests to `endpoint` (it takes batches)."""
        replicas = self._replicas.get(endpoint)
        if replicas is None:
            return endpoint in self._batching
        return any(replica in self._batching for replica in replicas)

    def concurrency(self, endpoint: str) -> float:
        """Return the current concurrency window of an endpoint."""
        window = self._windows.get(endpoint)
        return window.limit if window is not None else float(min(self._initial, self._ceiling))

    async def run(
        self,
        endpoint: str,
        request: function_pb2.RunRequest,
        time_limit: float,
        *,
        journal_delta: bool = False,
        cancel: bool = False,
        then: Resume | None = None,
    ) -> Outcome:
        """Make one Run attempt.

        Args:
            endpoint: Base URL of the function endpoint.
            request: The request to send.
            time_limit: Seconds the whole attempt may take, queueing for a slot excluded.
            journal_delta: Announce the journal extension (endpoints of other SDKs
                ignore the header).
            cancel: Mark the resume of a call being cancelled: an endpoint of this SDK
                raises ``CancelledError`` at the function's pending await (endpoints
                of other SDKs ignore the header and resume it as usual).
            then: The resume of the request's caller, to run after the request if the
                endpoint takes batches (see `Resume`); its answer comes as
                `Outcome.resumed`.

        Returns:
            The outcome; network and HTTP failures are outcomes too, never exceptions.
        """
        if self._session is None:
            raise RuntimeError("the invoker is not open")
        replicas = self._replicas.get(endpoint)
        if replicas is None:
            return await self._attempt(endpoint, request, time_limit, journal_delta, cancel, then)
        ranking = self._ranking(replicas, request.dispatch_id)
        for i, replica in enumerate(ranking):
            # The resume runs only where the caller is held live: harmless elsewhere.
            outcome = await self._attempt(replica, request, time_limit, journal_delta, cancel, then)
            if outcome.unsent or _is_overload(outcome):
                self._passed_over[replica] = time.monotonic() + self._replica_backoff
            if not outcome.unsent or i == len(ranking) - 1:
                break
        return outcome

    def _ranking(self, replicas: tuple[str, ...], dispatch_id: str) -> list[str]:
        """Replicas in the call's order (rendezvous hashing), those passed over last."""

        def weight(replica: str) -> bytes:
            key = f"{dispatch_id}\0{replica}".encode()
            return hashlib.blake2b(key, digest_size=8).digest()

        ranked = sorted(replicas, key=weight, reverse=True)
        now = time.monotonic()
        usable = [r for r in ranked if self._passed_over.get(r, 0.0) <= now]
        return usable + [r for r in ranked if r not in usable]

    async def _attempt(
        self,
        endpoint: str,
        request: function_pb2.RunRequest,
        time_limit: float,
        journal_delta: bool,
        cancel: bool,
        then: Resume | None,
    ) -> Outcome:
        session = self._session
        assert session is not None  # checked by `run`
        window = self._windows.get(endpoint)
        if window is None:
            window = self._windows[endpoint] = _Window(self._initial, self._ceiling)
        local = self._local.get(endpoint)
        body = b"" if local is not None else request.SerializeToString()
        epoch = await window.acquire()
        outcome = Outcome(Status.UNSPECIFIED, error="the attempt was interrupted")
        try:
            if local is not None:
                outcome = await self._hand_over(local, request, time_limit, journal_delta, cancel)
            else:
                outcome = await self._send(
                    session, endpoint, body, time_limit, journal_delta, cancel, then
                )
        finally:
            window.release(
                epoch,
                success=outcome.response is not None and outcome.status is not Status.THROTTLED,
                overload=_is_overload(outcome),
            )
        self._watch(endpoint, window, outcome)
        return outcome

    def _watch(self, endpoint: str, window: _Window, outcome: Outcome) -> None:
        now = time.monotonic()
        if outcome.http_status or outcome.response is not None:
            if window.warned and window.down_since is not None:
                logger.warning(
                    "endpoint %s answers again, after %.0f s unreachable",
                    endpoint,
                    now - window.down_since,
                )
            window.down_since, window.warned = None, False
        elif outcome.status in _UNREACHABLE:
            if window.down_since is None:
                window.down_since = now
            elif not window.warned and now - window.down_since >= self._unreachable_warning:
                window.warned = True
                logger.warning(
                    "endpoint %s has been unreachable for %.0f s (%s); its calls wait and are "
                    "retried until they expire: is the app running at that address?",
                    endpoint,
                    now - window.down_since,
                    outcome.error,
                )

    async def _hand_over(
        self,
        handler: LocalHandler,
        request: function_pb2.RunRequest,
        time_limit: float,
        journal_delta: bool,
        cancel: bool,
    ) -> Outcome:
        # A task of its own: past the time limit the run goes on, unobserved, as it would
        # behind an HTTP request that timed out; cancelling it could tear a live run.
        task = asyncio.ensure_future(handler(request, journal_delta, cancel))
        self._local_tasks.add(task)
        task.add_done_callback(self._local_done)
        done, _ = await asyncio.wait((task,), timeout=max(time_limit, 0.001))
        if not done:
            return Outcome(Status.TIMEOUT, error=f"no response within {time_limit:.3g} s")
        try:
            return _response(task.result())
        except LookupError as exc:
            return Outcome(Status.NOT_FOUND, error=str(exc))
        except Exception as exc:
            logger.error("the in-process endpoint failed on %s", request.function, exc_info=exc)
            return Outcome(Status.TEMPORARY_ERROR, error=f"the endpoint failed: {exc!r}")

    def _local_done(self, task: asyncio.Task[function_pb2.RunResponse]) -> None:
        self._local_tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: reported by `_hand_over` when it was waited for

    async def _send(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        body: bytes,
        time_limit: float,
        journal_delta: bool,
        cancel: bool,
        then: Resume | None,
    ) -> Outcome:
        attempt = ATTEMPT.get()
        if endpoint in self._batching and len(body) <= _BATCH_ITEM_MAX:
            item = batch_pb2.BatchItem(
                request=body, journal_delta=journal_delta, cancel=cancel, attempt=attempt
            )
            if then is not None:
                item.then = then.request
                item.then_correlation_id = then.correlation_id
                item.then_attempt = then.attempt
            outcome = await self._send_batched(session, endpoint, item, time_limit, then)
            if outcome is not None:
                return outcome
        return await self._send_alone(
            session, endpoint, body, time_limit, journal_delta, cancel, attempt
        )

    def _signed(self, url: str, body: bytes) -> dict[str, str]:
        # Signed after the slot is acquired, so that `created` is the sending time.
        signer = self._signers.get(url)
        if signer is None:
            key = self._key() if callable(self._key) else self._key  # loaded when first used
            signer = self._signers[url] = RequestSigner(key, "POST", url, _HEADERS)
        return {**_HEADERS, **signer.sign(body)}

    async def _send_alone(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        body: bytes,
        time_limit: float,
        journal_delta: bool,
        cancel: bool,
        attempt: int,
    ) -> Outcome:
        url = run_url(endpoint)
        headers = self._signed(url, body)
        if journal_delta:
            headers.update(_DELTA_HEADERS)
        if cancel:
            headers.update(_CANCEL_HEADERS)
        if attempt:
            headers[ATTEMPT_HEADER] = str(attempt)
        try:
            async with session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(time_limit, 0.001)),
                allow_redirects=False,
            ) as resp:
                content = await resp.read()
                if resp.headers.get(BATCH_HEADER) == "1" and endpoint not in self._batch_refused:
                    self._batching.add(endpoint)
                return _http_outcome(resp.status, content, resp.content_type)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _failure(exc, time_limit)

    async def _send_batched(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        item: batch_pb2.BatchItem,
        time_limit: float,
        then: Resume | None,
    ) -> Outcome | None:
        """Send a request in the batch leaving at the end of this loop iteration.

        Returns None when the endpoint no longer takes batches: the request was not
        run, and goes alone.
        """
        batch = self._batches.get(endpoint)
        size = item.ByteSize()
        if batch is None or len(batch.items) >= _BATCH_ITEMS or batch.size + size > _BATCH_BYTES:
            batch = self._batches[endpoint] = _Batch()
            asyncio.get_running_loop().call_soon(self._start_batch, session, endpoint, batch)
        # Past its time limit, the batch answers the request with a time-out (one timer
        # for the batch); the others' answers still come.
        answer = batch.add(item, size, max(time_limit, 0.001))
        resumed = None if then is None else batch.add_resume(then.time_limit)
        outcome = await answer
        if outcome is not None and resumed is not None:
            outcome = dataclasses.replace(outcome, resumed=resumed)
        return outcome

    def _start_batch(self, session: aiohttp.ClientSession, endpoint: str, batch: _Batch) -> None:
        if self._batches.get(endpoint) is batch:
            del self._batches[endpoint]
        if len(batch.items) == 1 and not batch.resumes:
            batch.answer(0, None)  # alone, it goes the plain way
            return
        task = asyncio.ensure_future(self._post_batch(session, endpoint, batch))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _post_batch(
        self, session: aiohttp.ClientSession, endpoint: str, batch: _Batch
    ) -> None:
        url = run_url(endpoint, BATCH_PATH)
        body = batch_pb2.RunBatch(items=batch.items).SerializeToString()
        failure: Outcome | None = None
        try:
            async with session.post(
                url,
                data=body,
                headers=self._signed(url, body),
                timeout=aiohttp.ClientTimeout(total=max(batch.time_limit, 0.001)),
                allow_redirects=False,
            ) as resp:
                if resp.status in (404, 405):
                    # Served without the batch route now (a route mounted by hand, a
                    # redeploy): nothing ran, and the requests go alone from now on.
                    self._batching.discard(endpoint)
                    self._batch_refused.add(endpoint)
                    batch.answer_all(None)
                    return
                if resp.status != 200 or resp.content_type != BATCH_TYPE:
                    content = await resp.read()
                    batch.answer_all(_http_outcome(resp.status, content, resp.content_type))
                    return
                while batch.unanswered or batch.resumes:
                    length = frame_length(await resp.content.readexactly(FRAME_HEADER))
                    answer = batch_pb2.BatchAnswer.FromString(
                        await resp.content.readexactly(length)
                    )
                    if answer.then:
                        batch.answer_resume(
                            answer.index,
                            _http_outcome(answer.status, answer.body, answer.content_type)
                            if answer.status
                            else None,
                        )
                    elif answer.index < len(batch.items):
                        batch.answer(
                            answer.index,
                            _http_outcome(answer.status, answer.body, answer.content_type),
                        )
                if not batch.expired:
                    # The stream ends with the last answer: read its end, so that the
                    # connection is kept for the next exchange instead of closed.
                    await resp.content.read()
        except asyncio.IncompleteReadError:
            failure = Outcome(
                Status.TCP_ERROR, error="the connection closed before the batch was answered"
            )
        except DecodeError as exc:
            failure = Outcome(
                Status.INVALID_RESPONSE, error=f"a batch answer cannot be decoded: {exc}"
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = _failure(exc, batch.time_limit)
        finally:
            batch.answer_all(
                failure or Outcome(Status.TCP_ERROR, error="the batch was interrupted")
            )
            for index in list(batch.resumes):  # not run, or their answers are lost
                batch.answer_resume(index, None)


@dataclass(slots=True)
class _Batch:
    """Run requests to one endpoint that leave together, and their answers to come.

    Each request has its own time limit. Rather than a timer per request, the batch
    keeps one, set for the earliest deadline of the requests not answered yet: the
    requests of a batch mostly share their limit, so it fires only for a late batch.
    """

    items: list[batch_pb2.BatchItem] = field(default_factory=list)
    futures: list[asyncio.Future[Outcome | None] | None] = field(default_factory=list)
    limits: list[float] = field(default_factory=list)
    size: int = 0
    unanswered: int = 0
    started: float = 0.0
    timer: asyncio.TimerHandle | None = None
    # The answers to come to the items' resumes (`Resume`), by index.
    resumes: dict[int, asyncio.Future[Outcome | None]] = field(default_factory=dict)
    resume_limit: float = 0.0  # the longest time limit of the resumes
    expired: bool = False  # a request was answered with a time-out: answers may follow

    def add(
        self, item: batch_pb2.BatchItem, size: int, time_limit: float
    ) -> asyncio.Future[Outcome | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome | None] = loop.create_future()
        if not self.items:
            self.started = loop.time()
        self.items.append(item)
        self.futures.append(future)
        self.limits.append(time_limit)
        self.size += size
        self.unanswered += 1
        deadline = self.started + time_limit
        if self.timer is None or deadline < self.timer.when():
            self._set_timer(loop, deadline)
        return future

    def add_resume(self, time_limit: float) -> asyncio.Future[Outcome | None]:
        """Expect an answer to the resume of the item added last."""
        future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self.resumes[len(self.items) - 1] = future
        self.resume_limit = max(self.resume_limit, time_limit)
        return future

    @property
    def time_limit(self) -> float:
        """The exchange's own: the longest time limit of its requests, then of a resume."""
        return max(self.limits, default=0.0) + self.resume_limit

    def answer_resume(self, index: int, outcome: Outcome | None) -> None:
        future = self.resumes.pop(index, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    def answer(self, index: int, outcome: Outcome | None) -> None:
        future = self.futures[index]
        if future is not None:  # the first answer counts
            self.futures[index] = None
            self.unanswered -= 1
            if not future.done():  # else its attempt gave up waiting
                future.set_result(outcome)
            if not self.unanswered and self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _set_timer(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Answer the requests past their time limit with a time-out; wait for the rest."""
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        later: float | None = None
        for i, limit in enumerate(self.limits):
            if self.futures[i] is None:
                continue
            deadline = self.started + limit
            if deadline <= now:
                self.expired = True
                self.answer(i, _failure(TimeoutError(), limit))
            elif later is None or deadline < later:
                later = deadline
        if later is not None:
            self._set_timer(loop, later)

    def answer_all(self, outcome: Outcome | None) -> None:
        for i in range(len(self.futures)):
            self.answer(i, outcome)


def _http_outcome(code: int, content: bytes, content_type: str) -> Outcome:
    """What an HTTP answer to a Run request says."""
    if code == 200 and content_type == _PROTO:
        try:
            return _response(function_pb2.RunResponse.FromString(content))
        except DecodeError as exc:
            return Outcome(
                Status.INVALID_RESPONSE,
                error=f"the RunResponse cannot be decoded: {exc}",
                http_status=200,
            )
    if code == 200:
        return Outcome(
            Status.INVALID_RESPONSE,
            error=f"HTTP 200 with Content-Type {content_type!r}, expected {_PROTO!r}",
            http_status=200,
        )
    status = status_for_http(code)
    if status in (Status.OK, Status.UNSPECIFIED):
        status = Status.INVALID_RESPONSE if status is Status.OK else Status.HTTP_ERROR
    return Outcome(
        status, error=f"HTTP {code}{_describe_body(content, content_type)}", http_status=code
    )


def _failure(exc: TimeoutError | aiohttp.ClientError, time_limit: float) -> Outcome:
    """What an exchange that failed without an answer says."""
    if isinstance(exc, TimeoutError):
        return Outcome(Status.TIMEOUT, error=f"no response within {time_limit:.3g} s")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Outcome(Status.DNS_ERROR, error=f"cannot resolve the endpoint: {exc}", unsent=True)
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return Outcome(Status.TLS_ERROR, error=f"TLS error: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):  # no connection: nothing was sent
        return Outcome(Status.TCP_ERROR, error=connection_failure(exc), unsent=True)
    if isinstance(exc, aiohttp.ClientConnectionError):
        return Outcome(Status.TCP_ERROR, error=connection_failure(exc))
    return Outcome(Status.HTTP_ERROR, error=f"HTTP error: {type(exc).__name__}: {exc}")


def _response(response: function_pb2.RunResponse) -> Outcome:
    try:
        status = Status(response.status)
    except ValueError:
        status = Status.UNSPECIFIED
    return Outcome(status, response=response)


def _is_overload(outcome: Outcome) -> bool:
    if outcome.status is Status.THROTTLED:
        return True
    if outcome.response is not None:
        return False
    if outcome.status in (Status.TIMEOUT, Status.TCP_ERROR):
        return True
    return outcome.http_status in _OVERLOAD_HTTP


def _describe_body(content: bytes, content_type: str) -> str:
    """Summarize an error body: the Connect error if it is one, else an excerpt."""
    if not content:
        return ""
    if content_type == "application/json":
        try:
            doc = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            # The Connect code is the call's status already: the message alone says more.
            return f": {doc['message']}"
    text = content[:_BODY_EXCERPT].decode("utf-8", "replace").strip()
    if len(content) > _BODY_EXCERPT:
        text += "..."
    return f": {text}" if text else ""
