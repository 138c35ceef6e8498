"""Run statuses and the rules that map exceptions, outputs and HTTP codes to them.

A durable function's outcome is reported to the scheduler as a `Status`; whether the
scheduler retries the call depends only on that status (`Status.temporary`). The
`Classifier` decides the status of a raised exception or a returned value: user
registrations first, then the `status` attribute of `dispatch_aio.errors` classes, then
built-in rules for asyncio, aiohttp, sockets, TLS and the standard exceptions.
"""

from __future__ import annotations

__all__ = [
    "Classifier",
    "Status",
    "status_for_connect_error",
    "status_for_http",
]

import asyncio
import concurrent.futures
import enum
import errno
import logging
import socket
import ssl
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp

logger = logging.getLogger(__name__)

_E = TypeVar("_E", bound=BaseException)
_T = TypeVar("_T")


class Status(enum.IntEnum):
    """Outcome of a function run, as carried by `dispatch.sdk.v1.Status`.

    The values are the protobuf enum values, so a `Status` can be assigned to a
    protobuf field directly and built back with ``Status(value)``.
    """

    UNSPECIFIED = 0
    """No status was given; the scheduler treats it as a terminal failure."""
    OK = 1
    """The function returned as expected."""
    TIMEOUT = 2
    """The function timed out; retried."""
    THROTTLED = 3
    """The function (or a service it called) was throttled; retried later."""
    INVALID_ARGUMENT = 4
    """The function was given an invalid input; not retried."""
    INVALID_RESPONSE = 5
    """The function received an unexpected response; not retried."""
    TEMPORARY_ERROR = 6
    """A temporary error; retried."""
    PERMANENT_ERROR = 7
    """A permanent error; not retried."""
    INCOMPATIBLE_STATE = 8
    """The saved state does not fit the code; the call is restarted from its input."""
    DNS_ERROR = 9
    """A DNS resolution error; retried."""
    TCP_ERROR = 10
    """A TCP connection error; retried."""
    TLS_ERROR = 11
    """A TLS error; retried."""
    HTTP_ERROR = 12
    """An HTTP protocol error; retried."""
    UNAUTHENTICATED = 13
    """The operation lacked valid credentials; not retried."""
    PERMISSION_DENIED = 14
    """The operation was not permitted; not retried."""
    NOT_FOUND = 15
    """The operation targeted a resource that does not exist; not retried."""

    @property
    def temporary(self) -> bool:
        """Whether a call that ends with this status is retried by the scheduler."""
        return self in _TEMPORARY

    @property
    def proto_name(self) -> str:
        """The protobuf name of the value, e.g. ``"STATUS_OK"``."""
        return f"STATUS_{self.name}"


_TEMPORARY = frozenset(
    {
        Status.TIMEOUT,
        Status.THROTTLED,
        Status.TEMPORARY_ERROR,
        Status.INCOMPATIBLE_STATE,
        Status.DNS_ERROR,
        Status.TCP_ERROR,
        Status.TLS_ERROR,
        Status.HTTP_ERROR,
    }
)

_HTTP_SPECIFIC: Mapping[int, Status] = types.MappingProxyType(
    {
        400: Status.INVALID_ARGUMENT,
        401: Status.UNAUTHENTICATED,
        403: Status.PERMISSION_DENIED,
        404: Status.NOT_FOUND,
        408: Status.TIMEOUT,
        429: Status.THROTTLED,
        501: Status.PERMANENT_ERROR,
    }
)


def status_for_http(code: int) -> Status:
    """Map an HTTP response code to a status.

    A few codes have their own status (400, 401, 403, 404, 408, 429, 501); the others are
    mapped by class: 2xx is OK, 5xx is a temporary error, 1xx, 3xx and 4xx are permanent
    errors, and anything outside 100-599 is UNSPECIFIED.

    Args:
        code: The HTTP status code.

    Returns:
        The status of a call that produced a response with this code.
    """
    specific = _HTTP_SPECIFIC.get(code)
    if specific is not None:
        return specific
    if 200 <= code < 300:
        return Status.OK
    if 500 <= code < 600:
        return Status.TEMPORARY_ERROR
    if 100 <= code < 500:
        return Status.PERMANENT_ERROR
    return Status.UNSPECIFIED


_CONNECT_CODES: Mapping[str, Status] = types.MappingProxyType(
    {
        "canceled": Status.TIMEOUT,
        "deadline_exceeded": Status.TIMEOUT,
        "unknown": Status.TEMPORARY_ERROR,
        "internal": Status.TEMPORARY_ERROR,
        "unavailable": Status.TEMPORARY_ERROR,
        "invalid_argument": Status.INVALID_ARGUMENT,
        "out_of_range": Status.INVALID_ARGUMENT,
        "not_found": Status.NOT_FOUND,
        "unimplemented": Status.NOT_FOUND,
        "already_exists": Status.PERMANENT_ERROR,
        "failed_precondition": Status.PERMANENT_ERROR,
        "aborted": Status.PERMANENT_ERROR,
        "data_loss": Status.PERMANENT_ERROR,
        "permission_denied": Status.PERMISSION_DENIED,
        "resource_exhausted": Status.THROTTLED,
        "unauthenticated": Status.UNAUTHENTICATED,
    }
)

# The Connect protocol's code for an error response that carries no Connect body.
_CONNECT_CODE_FOR_HTTP: Mapping[int, str] = types.MappingProxyType(
    {
        401: "unauthenticated",
        403: "permission_denied",
        404: "unimplemented",
        429: "unavailable",
        502: "unavailable",
        503: "unavailable",
        504: "unavailable",
    }
)


def status_for_connect_error(code: str, http_status: int) -> Status:
    """Map a Connect error answered by a Dispatch API to a status.

    Args:
        code: The Connect error code (``"unavailable"``, ``"not_found"`` ...); empty or
            unrecognised when the response had no Connect error body.
        http_status: The HTTP status code of the response, used when `code` is not a
            Connect code.

    Returns:
        The status of the failed API call (never OK or UNSPECIFIED).
    """
    if http_status == 413:  # too large: as large when retried, whatever the code says
        return Status.PERMANENT_ERROR
    status = _CONNECT_CODES.get(code)
    if status is None:
        status = _CONNECT_CODES[_CONNECT_CODE_FOR_HTTP.get(http_status, "unknown")]
    return status


_ERRNO_STATUS: Mapping[int, Status] = types.MappingProxyType(
    {
        number: status
        for names, status in (
            (
                (
                    "ECONNREFUSED",
                    "ECONNRESET",
                    "ECONNABORTED",
                    "EPIPE",
                    "ENETDOWN",
                    "ENETUNREACH",
                    "ENETRESET",
                    "EHOSTDOWN",
                    "EHOSTUNREACH",
                    "EADDRNOTAVAIL",
                ),
                Status.TCP_ERROR,
            ),
            (("ETIMEDOUT",), Status.TIMEOUT),
            (("EPERM", "EACCES"), Status.PERMISSION_DENIED),
            (
                ("EAGAIN", "EINTR", "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"),
                Status.TEMPORARY_ERROR,
            ),
        )
        for name in names
        # Some names (EHOSTDOWN ...) do not exist on every platform.
        if (number := getattr(errno, name, None)) is not None
    }
)

_StatusOrFn = Status | Callable[[Any], Status]


class Classifier:
    """Decides the status of a function's exception or return value.

    Each `Dispatch` object owns one classifier, so registrations made for one
    application never leak into another. A classifier with no registrations applies the
    default rules.
    """

    def __init__(self) -> None:
        self._errors: dict[type, _StatusOrFn] = {}
        self._outputs: dict[type, _StatusOrFn] = {}

    def register_error_type(
        self, cls: type[_E], status_or_fn: Status | Callable[[_E], Status]
    ) -> None:
        """Set the status of exceptions of type `cls` (and its subclasses).

        Registrations are looked up along the exception type's MRO, so a registration
        for a subclass wins over one for its base; they take precedence over every
        built-in rule. Registering the same class again replaces the earlier entry.

        Args:
            cls: The exception class.
            status_or_fn: The status, or a function of the exception returning it. If the
                function raises, the exception gets its default status (and a warning is
                logged); OK and UNSPECIFIED are reported as PERMANENT_ERROR.

        Raises:
            TypeError: `cls` is not an exception class, or `status_or_fn` is neither a
                status nor a callable.
            ValueError: `status_or_fn` is `Status.OK`: an exception is never a success.
        """
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(
                f"register_error_type() expects an exception class, got {cls!r}; "
                "use register_output_type() for return values"
            )
        entry = _check_status_or_fn("register_error_type", status_or_fn)
        if entry is Status.OK:
            raise ValueError(
                f"register_error_type({cls.__qualname__}, Status.OK): an exception cannot "
                "report success; choose an error status such as Status.PERMANENT_ERROR"
            )
        self._errors[cls] = entry

    def register_output_type(
        self, cls: type[_T], status_or_fn: Status | Callable[[_T], Status]
    ) -> None:
        """Set the status of return values of type `cls` (and its subclasses).

        Use it for values that describe a failure, such as a response object whose code
        says the request failed. Registrations are looked up along the value type's MRO.

        Args:
            cls: The type of the returned value.
            status_or_fn: The status, or a function of the value returning it. If the
                function raises, the value gets its default status and a warning is
                logged.

        Raises:
            TypeError: `cls` is not a class, or `status_or_fn` is neither a status nor a
                callable.
        """
        if not isinstance(cls, type):
            raise TypeError(f"register_output_type() expects a class, got {cls!r}")
        self._outputs[cls] = _check_status_or_fn("register_output_type", status_or_fn)

    def status_for_error(self, exc: BaseException) -> Status:
        """Return the status of a call that raised `exc`.

        Args:
            exc: The exception raised by the function.

        Returns:
            The status; never OK or UNSPECIFIED.
        """
        status = _lookup(self._errors, exc)
        if status is None:
            status = _default_error_status(exc)
        if status in (Status.OK, Status.UNSPECIFIED):
            return Status.PERMANENT_ERROR
        return status

    def status_for_output(self, value: object) -> Status:
        """Return the status of a call that returned `value`.

        Args:
            value: The value returned by the function.

        Returns:
            The status: OK unless a registration or a built-in rule (an
            `aiohttp.ClientResponse` is classified by its HTTP code) says otherwise.
        """
        status = _lookup(self._outputs, value)
        if status is not None:
            return status
        if isinstance(value, aiohttp.ClientResponse):
            status = status_for_http(value.status)
            return Status.HTTP_ERROR if status is Status.UNSPECIFIED else status
        return Status.OK


def _check_status_or_fn(method: str, status_or_fn: object) -> _StatusOrFn:
    if isinstance(status_or_fn, Status):
        return status_or_fn
    if isinstance(status_or_fn, int) and not isinstance(status_or_fn, bool):
        try:
            return Status(status_or_fn)
        except ValueError:
            raise ValueError(f"{method}(): {status_or_fn} is not a Status value") from None
    if callable(status_or_fn):
        return status_or_fn
    raise TypeError(
        f"{method}() expects a Status or a function returning one, got {status_or_fn!r}"
    )


def _lookup(registry: Mapping[type, _StatusOrFn], obj: object) -> Status | None:
    if not registry:
        return None
    for cls in type(obj).__mro__:
        entry = registry.get(cls)
        if entry is None:
            continue
        if isinstance(entry, Status):
            return entry
        try:
            return Status(entry(obj))
        except Exception:
            logger.warning(
                "status function %r registered for %s failed on %r; "
                "using the default classification",
                entry,
                cls.__qualname__,
                obj,
                exc_info=True,
            )
            return None
    return None


def _default_error_status(exc: BaseException) -> Status:
    # Imported here because errors.py imports Status from this module.
    from . import errors

    if isinstance(exc, errors.ClientError):
        return status_for_connect_error(exc.code, exc.http_status)
    if isinstance(exc, errors.DispatchError):
        return type(exc).status
    if isinstance(exc, asyncio.CancelledError):
        # Only a function that cancelled itself ends with this (it cancelled its own
        # task, or awaited one it cancelled): a cancellation from outside (the endpoint
        # shutting down) ends the Run request with no answer, which the scheduler
        # retries. asyncio never restarts a cancelled task, and neither do we: the
        # caller gets the error at once.
        return Status.PERMANENT_ERROR
    if isinstance(exc, concurrent.futures.BrokenExecutor):
        # A process of the pool died (killed, out of memory) or could not start.
        return Status.TEMPORARY_ERROR
    if isinstance(exc, KeyboardInterrupt):
        # The worker was interrupted, not the call at fault: run it again elsewhere.
        return Status.TEMPORARY_ERROR
    if isinstance(exc, aiohttp.ClientError):
        return _aiohttp_error_status(exc)
    if isinstance(exc, socket.gaierror | socket.herror):
        return Status.DNS_ERROR
    # Before the OSError rules: SSL errors are OSErrors, and a TLS failure is retried as
    # such rather than as an unspecific temporary error.
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return Status.TLS_ERROR
    if isinstance(exc, TimeoutError):
        return Status.TIMEOUT
    if isinstance(exc, ConnectionError):
        return Status.TCP_ERROR
    if isinstance(exc, PermissionError):
        return Status.PERMISSION_DENIED
    if isinstance(exc, FileNotFoundError):
        return Status.NOT_FOUND
    if isinstance(exc, InterruptedError):
        return Status.TEMPORARY_ERROR
    if isinstance(exc, OSError):
        if exc.errno is None:
            return Status.TEMPORARY_ERROR
        return _ERRNO_STATUS.get(exc.errno, Status.TEMPORARY_ERROR)
    if isinstance(exc, EOFError):
        return Status.TEMPORARY_ERROR
    if isinstance(exc, TypeError | ValueError):
        return Status.INVALID_ARGUMENT
    return Status.PERMANENT_ERROR


def _aiohttp_error_status(exc: aiohttp.ClientError) -> Status:
    # Most specific first: several of these classes derive from one another.
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Status.DNS_ERROR
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError):
        return Status.TLS_ERROR
    if isinstance(exc, aiohttp.ServerTimeoutError | aiohttp.ConnectionTimeoutError):
        return Status.TIMEOUT
    if isinstance(exc, aiohttp.ClientResponseError):
        status = status_for_http(exc.status)
        if status is Status.OK:
            # A 2xx response that could not be used (wrong content type ...).
            return Status.INVALID_RESPONSE
        if status is Status.UNSPECIFIED:
            # No status, or one outside 100-599: the peer broke the HTTP protocol.
            return Status.HTTP_ERROR
        return status
    if isinstance(exc, aiohttp.ClientConnectionError):
        return Status.TCP_ERROR
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Status.INVALID_ARGUMENT
    return Status.TEMPORARY_ERROR
