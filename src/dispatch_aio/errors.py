"""Exceptions raised by dispatch_aio, and the ones a durable function raises to pick a status.

Every class has a `status` class attribute: when a durable function raises one of these
exceptions, the call ends with that status, and the scheduler retries it or not
accordingly (see each class). Most classes also derive from the matching builtin, so
``except TimeoutError`` or ``except ValueError`` keeps working.

The hierarchy::

    DispatchError                                  (not retried)
    ├── TemporaryError                             TEMPORARY_ERROR      retried
    ├── PermanentError                             PERMANENT_ERROR
    ├── DispatchTimeoutError (TimeoutError)        TIMEOUT              retried
    ├── ThrottledError                             THROTTLED            retried
    ├── InvalidArgumentError (ValueError)          INVALID_ARGUMENT
    ├── InvalidResponseError (ValueError)          INVALID_RESPONSE
    ├── IncompatibleStateError                     INCOMPATIBLE_STATE   restarted
    │   └── NondeterminismError                    INCOMPATIBLE_STATE   restarted
    ├── CancelledCallError                         PERMANENT_ERROR      (a cancelled call)
    ├── DNSError (ConnectionError)                 DNS_ERROR            retried
    ├── TCPError (ConnectionError)                 TCP_ERROR            retried
    ├── TLSError (ConnectionError)                 TLS_ERROR            retried
    ├── HTTPError (ConnectionError)                HTTP_ERROR           retried
    ├── UnauthenticatedError (PermissionError)     UNAUTHENTICATED
    ├── PermissionDeniedError (PermissionError)    PERMISSION_DENIED
    ├── NotFoundError (LookupError)                NOT_FOUND
    ├── RemoteError                                PERMANENT_ERROR
    ├── HostLoopError (RuntimeError)               PERMANENT_ERROR
    ├── ConfigurationError (ValueError)            PERMANENT_ERROR
    ├── CodecError                                 INVALID_ARGUMENT
    │   ├── EncodeError (TypeError)                INVALID_ARGUMENT     (an argument or result)
    │   └── DecodeError (ValueError)               INVALID_ARGUMENT
    └── ClientError                                from the Connect code
        └── EventAlreadyResolvedError (ValueError) PERMANENT_ERROR      (send_event twice)

Exceptions travel between processes pickled; every class here (and every subclass that
keeps calling ``super().__init__``) pickles and unpickles with its properties, whatever
its constructor's signature.
"""

__all__ = [
    "CancelledCallError",
    "ClientError",
    "CodecError",
    "ConfigurationError",
    "DNSError",
    "DecodeError",
    "DispatchError",
    "DispatchTimeoutError",
    "EncodeError",
    "EventAlreadyResolvedError",
    "HTTPError",
    "HostLoopError",
    "IncompatibleStateError",
    "InvalidArgumentError",
    "InvalidResponseError",
    "NondeterminismError",
    "NotFoundError",
    "PermanentError",
    "PermissionDeniedError",
    "RemoteError",
    "TCPError",
    "TLSError",
    "TemporaryError",
    "ThrottledError",
    "UnauthenticatedError",
]

from typing import Any as _Any
from typing import ClassVar as _ClassVar
from typing import Self as _Self

from ._status import Status as _Status

_CONSTRUCTOR_ATTRS = frozenset({"_ctor_args", "_ctor_kwargs"})


class DispatchError(Exception):
    """Root of every exception defined by dispatch_aio.

    Catch it to handle any error from the SDK. Raised as is from a durable function, the
    call fails with PERMANENT_ERROR and is not retried.
    """

    status: _ClassVar[_Status] = _Status.UNSPECIFIED
    """The status of a call that fails with this exception (UNSPECIFIED is reported as
    PERMANENT_ERROR)."""

    _ctor_args: tuple[_Any, ...]
    _ctor_kwargs: dict[str, _Any]

    def __new__(cls, *args: _Any, **kwargs: _Any) -> _Self:
        """Create the exception, recording its constructor arguments for pickling."""
        # Keep the constructor arguments so that __reduce__ can call the constructor
        # again: the default exception pickling replays only `self.args`, which breaks
        # every subclass whose constructor takes other (or keyword-only) arguments.
        # Builtin bases such as OSError reject keyword arguments in __new__.
        self = super().__new__(cls, *args)
        self._ctor_args = args
        self._ctor_kwargs = kwargs
        return self

    def __reduce__(self) -> tuple[_Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k not in _CONSTRUCTOR_ATTRS}
        return (_rebuild, (type(self), self._ctor_args, self._ctor_kwargs), state or None)


def _rebuild(
    cls: type[DispatchError], args: tuple[_Any, ...], kwargs: dict[str, _Any]
) -> DispatchError:
    return cls(*args, **kwargs)


class TemporaryError(DispatchError):
    """Raise it from a durable function to report a temporary failure.

    The call fails with TEMPORARY_ERROR and is retried.
    """

    status = _Status.TEMPORARY_ERROR


class PermanentError(DispatchError):
    """Raise it from a durable function to report a failure that retrying cannot fix.

    The call fails with PERMANENT_ERROR and is not retried.
    """

    status = _Status.PERMANENT_ERROR


class DispatchTimeoutError(DispatchError, TimeoutError):
    """An operation took too long.

    Raise it (or any `TimeoutError`) from a durable function to report a timeout: the call
    fails with TIMEOUT and is retried.
    """

    status = _Status.TIMEOUT


class ThrottledError(DispatchError):
    """A service refused the work because of rate limits or load.

    Raise it from a durable function to have the call retried later (THROTTLED).
    """

    status = _Status.THROTTLED


class InvalidArgumentError(DispatchError, ValueError):
    """A function was given an input it cannot accept.

    Raise it (or any `ValueError`/`TypeError`) from a durable function to fail the call with
    INVALID_ARGUMENT; it is not retried.
    """

    status = _Status.INVALID_ARGUMENT


class InvalidResponseError(DispatchError, ValueError):
    """A service answered with a response that cannot be used.

    The call fails with INVALID_RESPONSE and is not retried.
    """

    status = _Status.INVALID_RESPONSE


class IncompatibleStateError(DispatchError):
    """A suspended call's saved state cannot be resumed by the current code.

    Raised when the state is corrupt, was written by another version of the SDK, or no
    longer matches the function. The call fails with INCOMPATIBLE_STATE and the scheduler
    restarts it from its original input.
    """

    status = _Status.INCOMPATIBLE_STATE


class CancelledCallError(DispatchError):
    """The call was cancelled (``await client.cancel(dispatch_id)``, ``dispatch-aio cancel``).

    `Client.result` raises it for a cancelled call, and a durable function that awaits a
    call cancelled on its own (not with the function's tree) receives it. A cancelled call
    makes no further attempts, and neither does any unfinished call below it.
    """

    status = _Status.PERMANENT_ERROR
    error_type: _ClassVar[str] = "dispatch_aio.CancelledCallError"
    """The ``Error.type`` a scheduler writes in the result of a cancelled call."""


class NondeterminismError(IncompatibleStateError):
    """Replaying a call found that the code and the call's journal disagree.

    The function did something different from what it did when the journal was recorded
    (another call, in another order, or with other arguments), usually because the code
    changed or depends on something that is not replayed (wall-clock time, randomness,
    I/O). What follows is the divergence policy's choice (``on_divergence`` of
    `dispatch_aio.Dispatch` or of the function): ``"restart"`` (the default) answers
    INCOMPATIBLE_STATE and the call is restarted from its input; ``"fail"`` ends the call
    with this error (PERMANENT_ERROR). Reading the clock or randomness directly is also
    reported with this error when detection is on (``nondeterminism=``).

    Args:
        message: What diverged, in one line.
        report: A detailed account of the divergence (expected and actual operations).
    """

    def __init__(self, message: str, *, report: str = "") -> None:
        super().__init__(f"{message}\n{report}" if report else message)
        self._message = message
        self._report = report

    @property
    def message(self) -> str:
        """What diverged, in one line."""
        return self._message

    @property
    def report(self) -> str:
        """A detailed account of the divergence, possibly empty."""
        return self._report


class DNSError(DispatchError, ConnectionError):
    """A host name could not be resolved.

    The call fails with DNS_ERROR and is retried.
    """

    status = _Status.DNS_ERROR


class TCPError(DispatchError, ConnectionError):
    """A TCP connection could not be established or was broken.

    The call fails with TCP_ERROR and is retried.
    """

    status = _Status.TCP_ERROR


class TLSError(DispatchError, ConnectionError):
    """A TLS handshake or certificate check failed.

    The call fails with TLS_ERROR and is retried.
    """

    status = _Status.TLS_ERROR


class HTTPError(DispatchError, ConnectionError):
    """An HTTP exchange failed at the protocol level.

    The call fails with HTTP_ERROR and is retried.
    """

    status = _Status.HTTP_ERROR


class UnauthenticatedError(DispatchError, PermissionError):
    """An operation was attempted without valid credentials.

    The call fails with UNAUTHENTICATED and is not retried.
    """

    status = _Status.UNAUTHENTICATED


class PermissionDeniedError(DispatchError, PermissionError):
    """An operation was refused for lack of permission.

    The call fails with PERMISSION_DENIED and is not retried.
    """

    status = _Status.PERMISSION_DENIED


class NotFoundError(DispatchError, LookupError):
    """An operation targeted something that does not exist.

    The call fails with NOT_FOUND and is not retried.
    """

    status = _Status.NOT_FOUND


class RemoteError(DispatchError):
    """Stand-in for an error whose original exception could not be reconstructed.

    Raised at the ``await`` of a call whose error came from another process (or another
    SDK) without a value this process can unpickle. A call that fails with it reports
    PERMANENT_ERROR and is not retried.

    Args:
        type_name: The error type reported by the remote side.
        message: The error message reported by the remote side.
    """

    status = _Status.PERMANENT_ERROR

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if type_name else message)
        self._type_name = type_name
        self._message = message

    @property
    def type_name(self) -> str:
        """The error type reported by the remote side."""
        return self._type_name

    @property
    def message(self) -> str:
        """The error message reported by the remote side."""
        return self._message


class HostLoopError(DispatchError, RuntimeError):
    """An object bound to another event loop was used inside a durable function.

    Durable functions run on their own event loop. Futures of the host loop (those of
    an application-wide aiohttp session or connection pool) are awaited there as
    forwarded I/O; an asyncio lock, event, semaphore or queue created outside the
    function, or a future of another run or thread, cannot be. Create the object
    inside the function, or share results through durable calls. The call fails with
    PERMANENT_ERROR and is not retried.
    """

    status = _Status.PERMANENT_ERROR


class CodecError(DispatchError):
    """A value or an error could not be converted to or from its wire form."""

    status = _Status.INVALID_ARGUMENT


class EncodeError(CodecError, TypeError):
    """A Python value cannot be encoded: it is neither a well-known type nor picklable.

    Raised where the value is given (a call's argument, a function's result); the message
    names the value's type and the part of it that does not pickle.
    """


class DecodeError(CodecError, ValueError):
    """A wire value cannot be decoded: unknown type URL, corrupt payload or failed unpickle."""


class ConfigurationError(DispatchError, ValueError):
    """A configuration value is missing or invalid.

    Raised when the SDK starts serving or builds a client, never at import time. The
    message names the environment variable (or argument), shows the offending value
    (secrets are masked) and says what to do. Not retried (PERMANENT_ERROR).

    Args:
        message: The full explanation.
        variable: The environment variable or argument at fault, e.g.
            ``"DISPATCH_API_URL"``.
        value: The offending value (masked if secret), or None if it is missing.
    """

    status = _Status.PERMANENT_ERROR

    def __init__(self, message: str, *, variable: str, value: str | None = None) -> None:
        super().__init__(message)
        self._variable = variable
        self._value = value

    @property
    def variable(self) -> str:
        """The environment variable or argument at fault."""
        return self._variable

    @property
    def value(self) -> str | None:
        """The offending value (masked if secret), or None if it is missing."""
        return self._value


_CLIENT_ERROR_HINTS = {
    "unauthenticated": "check the API key (DISPATCH_API_KEY, or api_key= of Dispatch())",
    "permission_denied": "check that the API key is allowed to perform this operation",
}


class ClientError(DispatchError):
    """The Dispatch API answered a request with an error.

    Its status (and so whether a call that fails with it is retried) follows the Connect
    error code: ``unavailable``, ``internal`` and ``unknown`` are TEMPORARY_ERROR
    (retried), ``resource_exhausted`` is THROTTLED (retried), ``deadline_exceeded`` and
    ``canceled`` are TIMEOUT (retried), ``unauthenticated`` is UNAUTHENTICATED,
    ``permission_denied`` is PERMISSION_DENIED, ``not_found`` and ``unimplemented`` are
    NOT_FOUND, ``invalid_argument`` and ``out_of_range`` are INVALID_ARGUMENT, the others
    PERMANENT_ERROR. Without a Connect code the HTTP status decides. An HTTP 413 (the
    request is too large) is PERMANENT_ERROR whatever its code. The `status` class
    attribute is the status of an ``unknown`` code.

    Args:
        message: The error message of the response.
        http_status: The HTTP status code of the response.
        code: The Connect error code (e.g. ``"unauthenticated"``), or ``""`` if the
            response carried none.
    """

    status = _Status.TEMPORARY_ERROR

    def __init__(self, message: str, *, http_status: int, code: str = "") -> None:
        what = f"Dispatch API error (HTTP {http_status}{', ' + code if code else ''})"
        text = f"{what}: {message}" if message else what
        hint = _CLIENT_ERROR_HINTS.get(code)
        super().__init__(f"{text}; {hint}" if hint else text)
        self._message = message
        self._http_status = http_status
        self._code = code

    @property
    def http_status(self) -> int:
        """The HTTP status code of the response."""
        return self._http_status

    @property
    def code(self) -> str:
        """The Connect error code, or ``""`` if the response carried none."""
        return self._code

    @property
    def message(self) -> str:
        """The error message of the response."""
        return self._message


class EventAlreadyResolvedError(ClientError, ValueError):
    """``send_event`` was given a key that is resolved already.

    A durable event is resolved once; its waiters received the first value. Use a new
    key for a new event.
    """

    status = _Status.PERMANENT_ERROR

    def __init__(
        self, message: str, *, http_status: int = 409, code: str = "already_exists"
    ) -> None:
        super().__init__(message, http_status=http_status, code=code)
