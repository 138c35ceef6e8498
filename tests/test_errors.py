import copy
import inspect
import pickle
from typing import Any

import cloudpickle
import pytest

from dispatch_aio import errors
from dispatch_aio._status import Status

ALL_CLASSES: list[type[errors.DispatchError]] = [
    obj
    for obj in vars(errors).values()
    if isinstance(obj, type) and issubclass(obj, errors.DispatchError)
]


def _public_properties(exc: BaseException) -> dict[str, Any]:
    return {
        name: getattr(exc, name)
        for name, member in inspect.getmembers(type(exc))
        if isinstance(member, property)
    }


# One instance of every class, built with each constructor's full signature.
INSTANCES: list[errors.DispatchError] = [
    errors.DispatchError("root"),
    errors.TemporaryError("try again"),
    errors.PermanentError("give up"),
    errors.DispatchTimeoutError("too slow"),
    errors.ThrottledError("slow down"),
    errors.InvalidArgumentError("bad input"),
    errors.InvalidResponseError("bad output"),
    errors.IncompatibleStateError("state version 9"),
    errors.NondeterminismError("call 3 differs", report="expected f(1)\ngot f(2)"),
    errors.CancelledCallError("call 1 (f) was cancelled"),
    errors.DNSError("no such host"),
    errors.TCPError("refused"),
    errors.TLSError("bad certificate"),
    errors.HTTPError("malformed response"),
    errors.UnauthenticatedError("who are you"),
    errors.PermissionDeniedError("no"),
    errors.NotFoundError("nothing here"),
    errors.RemoteError("ValueError", "remote message"),
    errors.HostLoopError("future of another loop"),
    errors.ConfigurationError("bad url", variable="DISPATCH_API_URL", value="ftp://x"),
    errors.CodecError("cannot convert"),
    errors.EncodeError("cannot encode argument 1: an open file cannot be passed"),
    errors.DecodeError("unknown type URL"),
    errors.ClientError("key revoked", http_status=401, code="unauthenticated"),
    errors.EventAlreadyResolvedError("the event 'k' is already resolved"),
]


def test_all_is_sorted_public_names() -> None:
    # "@py_builtins" and friends: pytest's assertion rewriting, active on this package
    # because its pytest plugin is registered.
    public = sorted(name for name in vars(errors) if not name.startswith(("_", "@")))
    assert errors.__all__ == public


def test_every_class_is_exported_and_exercised() -> None:
    assert {cls.__name__ for cls in ALL_CLASSES} == set(errors.__all__)
    assert {type(exc) for exc in INSTANCES} == set(ALL_CLASSES)


def test_names_do_not_shadow_builtins() -> None:
    import builtins

    assert not set(errors.__all__) & set(dir(builtins))


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.DispatchTimeoutError, TimeoutError),
        (errors.InvalidArgumentError, ValueError),
        (errors.InvalidResponseError, ValueError),
        (errors.DNSError, ConnectionError),
        (errors.TCPError, ConnectionError),
        (errors.TLSError, ConnectionError),
        (errors.HTTPError, ConnectionError),
        (errors.UnauthenticatedError, PermissionError),
        (errors.PermissionDeniedError, PermissionError),
        (errors.NotFoundError, LookupError),
        (errors.HostLoopError, RuntimeError),
        (errors.ConfigurationError, ValueError),
    ],
)
def test_builtin_except_clauses_catch(cls: type[errors.DispatchError], builtin: type) -> None:
    exc = next(e for e in INSTANCES if type(e) is cls)
    with pytest.raises(builtin) as info:
        raise exc
    assert info.value is exc
    assert isinstance(exc, errors.DispatchError)


def test_every_class_derives_from_the_root_and_exception() -> None:
    for cls in ALL_CLASSES:
        assert issubclass(cls, errors.DispatchError)
        assert issubclass(cls, Exception)
    assert errors.DispatchError.__bases__ == (Exception,)


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.DispatchError, Status.UNSPECIFIED),
        (errors.TemporaryError, Status.TEMPORARY_ERROR),
        (errors.PermanentError, Status.PERMANENT_ERROR),
        (errors.DispatchTimeoutError, Status.TIMEOUT),
        (errors.ThrottledError, Status.THROTTLED),
        (errors.InvalidArgumentError, Status.INVALID_ARGUMENT),
        (errors.InvalidResponseError, Status.INVALID_RESPONSE),
        (errors.IncompatibleStateError, Status.INCOMPATIBLE_STATE),
        (errors.NondeterminismError, Status.INCOMPATIBLE_STATE),
        (errors.DNSError, Status.DNS_ERROR),
        (errors.TCPError, Status.TCP_ERROR),
        (errors.TLSError, Status.TLS_ERROR),
        (errors.HTTPError, Status.HTTP_ERROR),
        (errors.UnauthenticatedError, Status.UNAUTHENTICATED),
        (errors.PermissionDeniedError, Status.PERMISSION_DENIED),
        (errors.NotFoundError, Status.NOT_FOUND),
        (errors.RemoteError, Status.PERMANENT_ERROR),
        (errors.HostLoopError, Status.PERMANENT_ERROR),
        (errors.ConfigurationError, Status.PERMANENT_ERROR),
        (errors.ClientError, Status.TEMPORARY_ERROR),
        (errors.EventAlreadyResolvedError, Status.PERMANENT_ERROR),
    ],
)
def test_status_attribute(cls: type[errors.DispatchError], status: Status) -> None:
    assert cls.status is status
    assert isinstance(cls.status, Status)


def test_retried_categories() -> None:
    retried = {cls for cls in ALL_CLASSES if cls.status.temporary}
    assert retried == {
        errors.TemporaryError,
        errors.DispatchTimeoutError,
        errors.ThrottledError,
        errors.IncompatibleStateError,
        errors.NondeterminismError,
        errors.DNSError,
        errors.TCPError,
        errors.TLSError,
        errors.HTTPError,
        errors.ClientError,
    }


def test_nondeterminism_error() -> None:
    exc = errors.NondeterminismError("call 3 differs", report="expected f(1)\ngot f(2)")
    assert isinstance(exc, errors.IncompatibleStateError)
    assert exc.message == "call 3 differs"
    assert exc.report == "expected f(1)\ngot f(2)"
    assert str(exc) == "call 3 differs\nexpected f(1)\ngot f(2)"
    assert str(errors.NondeterminismError("short")) == "short"
    assert errors.NondeterminismError("short").report == ""


def test_remote_error_is_unchanged() -> None:
    exc = errors.RemoteError("KeyError", "'k'")
    assert (exc.type_name, exc.message, str(exc)) == ("KeyError", "'k'", "KeyError: 'k'")
    assert str(errors.RemoteError("", "just text")) == "just text"


def test_configuration_error() -> None:
    exc = errors.ConfigurationError("msg", variable="DISPATCH_API_URL", value="ftp://x")
    assert (str(exc), exc.variable, exc.value) == ("msg", "DISPATCH_API_URL", "ftp://x")
    assert errors.ConfigurationError("m", variable="V").value is None


def test_client_error() -> None:
    exc = errors.ClientError("invalid key", http_status=401, code="unauthenticated")
    assert (exc.http_status, exc.code, exc.message) == (401, "unauthenticated", "invalid key")
    text = str(exc)
    assert "401" in text
    assert "unauthenticated" in text
    assert "invalid key" in text
    assert "DISPATCH_API_KEY" in text
    bare = errors.ClientError("", http_status=502)
    assert (bare.code, bare.message) == ("", "")
    assert str(bare) == "Dispatch API error (HTTP 502)"


@pytest.mark.parametrize("exc", INSTANCES, ids=lambda e: type(e).__name__)
def test_read_only_properties(exc: errors.DispatchError) -> None:
    for name in _public_properties(exc):
        with pytest.raises(AttributeError):
            setattr(exc, name, "changed")


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("exc", INSTANCES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip(exc: errors.DispatchError, dumps: Any) -> None:
    clone = pickle.loads(dumps(exc))
    assert type(clone) is type(exc)
    assert clone is not exc
    assert str(clone) == str(exc)
    assert clone.args == exc.args
    assert _public_properties(clone) == _public_properties(exc)
    if isinstance(exc, OSError):
        assert (clone.errno, clone.strerror) == (exc.errno, exc.strerror)


def test_pickle_keeps_notes_and_extra_attributes() -> None:
    exc = errors.ClientError("busy", http_status=503, code="unavailable")
    exc.add_note("while dispatching f")
    exc.attempt = 3  # type: ignore[attr-defined]
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.__notes__ == ["while dispatching f"]
    assert clone.attempt == 3
    assert clone.code == "unavailable"


def test_copy_works() -> None:
    exc = errors.ConfigurationError("m", variable="V", value="x")
    assert copy.copy(exc).variable == "V"
    assert copy.deepcopy(exc).value == "x"


class UserError(errors.PermanentError):
    """A user subclass whose constructor does not take a message."""

    def __init__(self, order_id: int, *, reason: str) -> None:
        super().__init__(f"order {order_id} rejected: {reason}")
        self.order_id = order_id
        self.reason = reason


def test_user_subclass_with_its_own_constructor_pickles() -> None:
    exc = UserError(42, reason="out of stock")
    clone = pickle.loads(pickle.dumps(exc))
    assert (clone.order_id, clone.reason, str(clone)) == (42, "out of stock", str(exc))


class PlainError(Exception):
    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def test_plain_exception_pickling_would_fail_for_these_constructors() -> None:
    # Why DispatchError rebuilds from constructor arguments: the default exception
    # pickling calls cls(*self.args), which such a constructor rejects.
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(PlainError("m", code="c")))


def test_local_user_subclass_round_trips_with_cloudpickle() -> None:
    class LocalError(errors.TemporaryError):
        def __init__(self, *, attempt: int) -> None:
            super().__init__(f"attempt {attempt}")
            self.attempt = attempt

    clone = pickle.loads(cloudpickle.dumps(LocalError(attempt=2)))
    assert clone.attempt == 2
    assert clone.status is Status.TEMPORARY_ERROR
    assert isinstance(clone, errors.DispatchError)


def test_docstring_draws_every_class() -> None:
    assert errors.__doc__ is not None
    for name in errors.__all__:
        assert name in errors.__doc__
