"""HTTP requests from durable functions, with failures classified into statuses.

::

    from dispatch_aio import http

    @dispatch.function
    async def fetch_user(user_id: int) -> dict:
        response = await http.get(f"https://api.example.com/users/{user_id}")
        return response.json()

`request` (and `get`, `post`, `put`, `patch`, `delete`, `head`) returns a small
`Response` with the whole body read. A response whose code is not 2xx raises the
`HTTPStatusError` subclass matching its status, which also derives from the
`dispatch_aio.errors` class of that status, so a function that lets it escape reports
the right status to the scheduler (and is retried or not accordingly):

=====================================  =======================================================
HTTP code                              Raised (status)
=====================================  =======================================================
400                                    `InvalidArgumentStatusError` (INVALID_ARGUMENT)
401                                    `UnauthenticatedStatusError` (UNAUTHENTICATED)
403                                    `PermissionDeniedStatusError` (PERMISSION_DENIED)
404                                    `NotFoundStatusError` (NOT_FOUND)
408                                    `TimeoutStatusError` (TIMEOUT, retried)
429                                    `ThrottledStatusError` (THROTTLED, retried)
5xx except 501                         `TemporaryStatusError` (TEMPORARY_ERROR, retried)
501, other 1xx, 3xx and 4xx            `PermanentStatusError` (PERMANENT_ERROR)
outside 100-599                        `InvalidStatusError` (HTTP_ERROR, retried)
=====================================  =======================================================

Failures without a response raise `dispatch_aio.errors` classes too: `DNSError`,
`TCPError`, `TLSError`, `DispatchTimeoutError`, `HTTPError` (all retried), or
`InvalidArgumentError` for an invalid URL.

Each call opens a session in the running event loop (the durable function's own loop)
and closes it. To reuse connections, pass a `session` created inside the same function.
An application-wide session belongs to the host loop and cannot be used inside a durable
function directly: wrap the request in `dispatch_aio.run_on_host`.

Replay: code between durable calls runs again when a function replays, so a request
made by a function that also makes durable calls is sent again on replay. To send it
once, make the request in a function of its own and call that function: its result (the
`Response`, or the error) is journaled by the caller.
"""

from __future__ import annotations

__all__ = [
    "HTTPStatusError",
    "InvalidArgumentStatusError",
    "InvalidStatusError",
    "NotFoundStatusError",
    "PermanentStatusError",
    "PermissionDeniedStatusError",
    "RequestOptions",
    "Response",
    "TemporaryStatusError",
    "ThrottledStatusError",
    "TimeoutStatusError",
    "UnauthenticatedStatusError",
    "delete",
    "get",
    "head",
    "patch",
    "post",
    "put",
    "request",
    "response_status",
]

import dataclasses
import json as _json
import urllib.parse
from collections.abc import Mapping
from typing import Any, TypedDict, Unpack

import aiohttp
import multidict

from . import errors
from ._status import Classifier, Status, status_for_http

_DEFAULT_TIMEOUT = 30.0
_SNIPPET = 200


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP response.

    It pickles, so a durable function can return it (its status is then the one of its
    HTTP code, see `response_status`).
    """

    status: int
    """The HTTP status code."""
    headers: Mapping[str, str]
    """The response headers (case-insensitive; repeated headers are all kept)."""
    body: bytes
    """The response body."""
    url: str
    """The final URL of the request (after redirects)."""
    reason: str = ""
    """The reason phrase, e.g. ``"Not Found"``."""
    method: str = ""
    """The method of the request, e.g. ``"GET"``."""

    @property
    def ok(self) -> bool:
        """Whether the status code is 2xx."""
        return 200 <= self.status < 300

    def text(self, encoding: str | None = None) -> str:
        """Return the body decoded as text.

        Args:
            encoding: The encoding; default the charset of the Content-Type header, else
                UTF-8. Undecodable bytes are replaced.
        """
        if encoding is None:
            content_type = self.headers.get("Content-Type", "")
            for param in content_type.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                if key.lower() == "charset" and value:
                    encoding = value.strip('"')
        try:
            return self.body.decode(encoding or "utf-8", "replace")
        except LookupError:  # an unknown charset
            return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """Return the body parsed as JSON.

        Raises:
            dispatch_aio.errors.InvalidResponseError: The body is not JSON.
        """
        try:
            return _json.loads(self.body)
        except ValueError as exc:
            raise errors.InvalidResponseError(
                f"the response of {_safe_url(self.url)} (HTTP {self.status}) is not JSON: {exc}"
            ) from None

    def raise_for_status(self) -> None:
        """Raise the `HTTPStatusError` subclass of the status code unless it is 2xx."""
        status = response_status(self)
        if status is not Status.OK:
            raise _STATUS_ERRORS.get(status, PermanentStatusError)(_describe(self), response=self)


def response_status(response: Response) -> Status:
    """Return the status of a call that returns `response` (or fails with its code)."""
    status = status_for_http(response.status)
    return Status.HTTP_ERROR if status is Status.UNSPECIFIED else status


class HTTPStatusError(errors.DispatchError):
    """A response had a code other than 2xx; each subclass matches one status.

    Args:
        message: What failed, with the code.
        response: The response.
    """

    def __init__(self, message: str, *, response: Response) -> None:
        super().__init__(message)
        self._response = response

    @property
    def response(self) -> Response:
        """The response, body included."""
        return self._response

    @property
    def status_code(self) -> int:
        """The HTTP status code of the response."""
        return self._response.status


class InvalidArgumentStatusError(HTTPStatusError, errors.InvalidArgumentError):
    """HTTP 400: the request was invalid (INVALID_ARGUMENT, not retried)."""


class UnauthenticatedStatusError(HTTPStatusError, errors.UnauthenticatedError):
    """HTTP 401: credentials are missing or wrong (UNAUTHENTICATED, not retried)."""


class PermissionDeniedStatusError(HTTPStatusError, errors.PermissionDeniedError):
    """HTTP 403: the request is not allowed (PERMISSION_DENIED, not retried)."""


class NotFoundStatusError(HTTPStatusError, errors.NotFoundError):
    """HTTP 404: the resource does not exist (NOT_FOUND, not retried)."""


class TimeoutStatusError(HTTPStatusError, errors.DispatchTimeoutError):
    """HTTP 408: the server timed out waiting for the request (TIMEOUT, retried)."""


class ThrottledStatusError(HTTPStatusError, errors.ThrottledError):
    """HTTP 429: too many requests (THROTTLED, retried later)."""


class TemporaryStatusError(HTTPStatusError, errors.TemporaryError):
    """HTTP 5xx other than 501: the server failed (TEMPORARY_ERROR, retried)."""


class PermanentStatusError(HTTPStatusError, errors.PermanentError):
    """HTTP 501 and codes without a status of their own (PERMANENT_ERROR, not retried)."""


class InvalidStatusError(HTTPStatusError, errors.HTTPError):
    """A code outside 100-599: the server broke the protocol (HTTP_ERROR, retried)."""


_STATUS_ERRORS: Mapping[Status, type[HTTPStatusError]] = {
    Status.INVALID_ARGUMENT: InvalidArgumentStatusError,
    Status.UNAUTHENTICATED: UnauthenticatedStatusError,
    Status.PERMISSION_DENIED: PermissionDeniedStatusError,
    Status.NOT_FOUND: NotFoundStatusError,
    Status.TIMEOUT: TimeoutStatusError,
    Status.THROTTLED: ThrottledStatusError,
    Status.TEMPORARY_ERROR: TemporaryStatusError,
    Status.PERMANENT_ERROR: PermanentStatusError,
    Status.HTTP_ERROR: InvalidStatusError,
}

# Failures without a response, by the status the default classification gives them.
_TRANSPORT_ERRORS: Mapping[Status, type[errors.DispatchError]] = {
    Status.DNS_ERROR: errors.DNSError,
    Status.TCP_ERROR: errors.TCPError,
    Status.TLS_ERROR: errors.TLSError,
    Status.TIMEOUT: errors.DispatchTimeoutError,
    Status.INVALID_ARGUMENT: errors.InvalidArgumentError,
    Status.INVALID_RESPONSE: errors.InvalidResponseError,
    Status.PERMANENT_ERROR: errors.PermanentError,
}


class RequestOptions(TypedDict, total=False):
    """Keyword arguments of `request` and its shortcuts."""

    params: Mapping[str, str | int | float]
    """Query string parameters."""
    headers: Mapping[str, str]
    """Request headers."""
    json: Any
    """A value sent as a JSON body (Content-Type: application/json)."""
    data: bytes | str
    """A raw body."""
    timeout: float | None
    """Seconds the whole request may take (30 by default); None for no limit."""
    raise_for_status: bool
    """Raise `HTTPStatusError` for codes other than 2xx (True by default)."""
    allow_redirects: bool
    """Follow redirects (True by default)."""
    session: aiohttp.ClientSession
    """A session to send the request with, created in the running event loop."""


async def request(method: str, url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send an HTTP request and read the whole response.

    Args:
        method: The HTTP method, e.g. ``"GET"``.
        url: The absolute URL.
        **options: See `RequestOptions`.

    Returns:
        The response.

    Raises:
        HTTPStatusError: The code is not 2xx (a subclass per status; see the module).
        dispatch_aio.errors.DispatchError: The request failed without a response
            (`DNSError`, `TCPError`, `TLSError`, `DispatchTimeoutError`, `HTTPError`,
            `InvalidArgumentError`).
        ValueError: Both ``json`` and ``data`` were given.
    """
    method = method.upper()
    if "json" in options and "data" in options:
        raise ValueError("pass either json= or data=, not both")
    timeout = options.get("timeout", _DEFAULT_TIMEOUT)
    kwargs: dict[str, Any] = {
        "params": options.get("params"),
        "headers": options.get("headers"),
        "data": options.get("data"),
        "timeout": aiohttp.ClientTimeout(total=timeout),
        "allow_redirects": options.get("allow_redirects", True),
    }
    if "json" in options:
        kwargs["json"] = options["json"]
    session = options.get("session")
    try:
        if session is None:
            async with aiohttp.ClientSession() as own:
                response = await _send(own, method, url, kwargs)
        else:
            response = await _send(session, method, url, kwargs)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        status = Classifier().status_for_error(exc)
        error = _TRANSPORT_ERRORS.get(status, errors.HTTPError)
        raise error(f"{method} {_safe_url(url)} failed: {_explain(exc)}") from exc
    if options.get("raise_for_status", True):
        response.raise_for_status()
    return response


async def _send(
    session: aiohttp.ClientSession, method: str, url: str, kwargs: dict[str, Any]
) -> Response:
    async with session.request(method, url, **kwargs) as resp:
        body = await resp.read()
        return Response(
            status=resp.status,
            headers=multidict.CIMultiDict(resp.headers),
            body=body,
            url=str(resp.url),
            reason=resp.reason or "",
            method=method,
        )


async def get(url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send a GET request; see `request`."""
    return await request("GET", url, **options)


async def post(url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send a POST request; see `request`."""
    return await request("POST", url, **options)


async def put(url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send a PUT request; see `request`."""
    return await request("PUT", url, **options)


async def patch(url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send a PATCH request; see `request`."""
    return await request("PATCH", url, **options)


async def delete(url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send a DELETE request; see `request`."""
    return await request("DELETE", url, **options)


async def head(url: str, **options: Unpack[RequestOptions]) -> Response:
    """Send a HEAD request; see `request`."""
    return await request("HEAD", url, **options)


def _safe_url(url: str) -> str:
    """The URL without credentials, query or fragment, which may hold secrets."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url.partition("?")[0].partition("#")[0]
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _explain(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__


def _describe(response: Response) -> str:
    text = response.text()
    snippet = text[:_SNIPPET].strip() + ("..." if len(text) > _SNIPPET else "")
    reason = f" {response.reason}" if response.reason else ""
    request = f"{response.method} {_safe_url(response.url)}".lstrip()
    return f"{request} answered HTTP {response.status}{reason}" + (
        f": {snippet}" if snippet else ""
    )
