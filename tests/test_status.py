import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from concurrent.futures.process import BrokenProcessPool

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from dispatch_aio import errors
from dispatch_aio._status import (
    Classifier,
    Status,
    status_for_connect_error,
    status_for_http,
)
from dispatch_aio.proto.sdk.v1 import status_pb2

TEMPORARY = {
    Status.TIMEOUT,
    Status.THROTTLED,
    Status.TEMPORARY_ERROR,
    Status.INCOMPATIBLE_STATE,
    Status.DNS_ERROR,
    Status.TCP_ERROR,
    Status.TLS_ERROR,
    Status.HTTP_ERROR,
}


# --- Status -----------------------------------------------------------------------------


def test_values_and_names_match_the_proto_enum() -> None:
    proto_names = set(status_pb2.Status.keys())
    assert {s.proto_name for s in Status} == proto_names
    for status in Status:
        assert status_pb2.Status.Value(status.proto_name) == status.value
        assert status_pb2.Status.Name(status) == status.proto_name


def test_members_in_proto_order() -> None:
    assert [s.value for s in Status] == list(range(16))
    assert Status.OK.proto_name == "STATUS_OK"
    assert Status.NOT_FOUND.proto_name == "STATUS_NOT_FOUND"


def test_temporary_set() -> None:
    assert {s for s in Status if s.temporary} == TEMPORARY
    assert not Status.OK.temporary
    assert not Status.UNSPECIFIED.temporary
    assert not Status.PERMANENT_ERROR.temporary


def test_status_round_trips_through_a_proto_field() -> None:
    from dispatch_aio.proto.sdk.v1 import function_pb2

    response = function_pb2.RunResponse(status=Status.THROTTLED)
    assert Status(response.status) is Status.THROTTLED


# --- HTTP and Connect codes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (100, Status.PERMANENT_ERROR),
        (199, Status.PERMANENT_ERROR),
        (200, Status.OK),
        (204, Status.OK),
        (299, Status.OK),
        (301, Status.PERMANENT_ERROR),
        (304, Status.PERMANENT_ERROR),
        (400, Status.INVALID_ARGUMENT),
        (401, Status.UNAUTHENTICATED),
        (402, Status.PERMANENT_ERROR),
        (403, Status.PERMISSION_DENIED),
        (404, Status.NOT_FOUND),
        (408, Status.TIMEOUT),
        (409, Status.PERMANENT_ERROR),
        (429, Status.THROTTLED),
        (499, Status.PERMANENT_ERROR),
        (500, Status.TEMPORARY_ERROR),
        (501, Status.PERMANENT_ERROR),
        (502, Status.TEMPORARY_ERROR),
        (503, Status.TEMPORARY_ERROR),
        (599, Status.TEMPORARY_ERROR),
        (600, Status.UNSPECIFIED),
        (99, Status.UNSPECIFIED),
        (0, Status.UNSPECIFIED),
        (-1, Status.UNSPECIFIED),
    ],
)
def test_status_for_http(code: int, expected: Status) -> None:
    assert status_for_http(code) is expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("canceled", Status.TIMEOUT),
        ("deadline_exceeded", Status.TIMEOUT),
        ("unknown", Status.TEMPORARY_ERROR),
        ("internal", Status.TEMPORARY_ERROR),
        ("unavailable", Status.TEMPORARY_ERROR),
        ("invalid_argument", Status.INVALID_ARGUMENT),
        ("out_of_range", Status.INVALID_ARGUMENT),
        ("not_found", Status.NOT_FOUND),
        ("unimplemented", Status.NOT_FOUND),
        ("already_exists", Status.PERMANENT_ERROR),
        ("failed_precondition", Status.PERMANENT_ERROR),
        ("aborted", Status.PERMANENT_ERROR),
        ("data_loss", Status.PERMANENT_ERROR),
        ("permission_denied", Status.PERMISSION_DENIED),
        ("resource_exhausted", Status.THROTTLED),
        ("unauthenticated", Status.UNAUTHENTICATED),
    ],
)
def test_status_for_connect_code(code: str, expected: Status) -> None:
    # The code wins over the HTTP status.
    assert status_for_connect_error(code, 500) is expected


@pytest.mark.parametrize(
    ("http_status", "expected"),
    [
        (401, Status.UNAUTHENTICATED),
        (403, Status.PERMISSION_DENIED),
        (404, Status.NOT_FOUND),
        (429, Status.TEMPORARY_ERROR),
        (502, Status.TEMPORARY_ERROR),
        (503, Status.TEMPORARY_ERROR),
        (504, Status.TEMPORARY_ERROR),
        (400, Status.TEMPORARY_ERROR),
        (500, Status.TEMPORARY_ERROR),
    ],
)
def test_status_for_connect_error_without_code(http_status: int, expected: Status) -> None:
    assert status_for_connect_error("", http_status) is expected
    assert status_for_connect_error("not-a-connect-code", http_status) is expected


# --- default error rules ----------------------------------------------------------------


def _request_info() -> RequestInfo:
    url = URL("http://127.0.0.1:1/x")
    return RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)


def _connection_key() -> ConnectionKey:
    return ConnectionKey("example.com", 443, True, True, None, None, None, None)


def _response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(_request_info(), (), status=status, message="boom")


def _os_error(number: int) -> OSError:
    return OSError(number, "failed")


def _cert_error() -> ssl.SSLCertVerificationError:
    return ssl.SSLCertVerificationError(1, "certificate verify failed")


ERROR_CASES: list[tuple[str, Callable[[], BaseException], Status]] = [
    # asyncio
    ("asyncio.TimeoutError", lambda: TimeoutError(), Status.TIMEOUT),
    ("TimeoutError", lambda: TimeoutError("slow"), Status.TIMEOUT),
    ("CancelledError", lambda: asyncio.CancelledError(), Status.PERMANENT_ERROR),
    # aiohttp
    (
        "ClientConnectorDNSError",
        lambda: aiohttp.ClientConnectorDNSError(
            _connection_key(), socket.gaierror(socket.EAI_NONAME, "unknown")
        ),
        Status.DNS_ERROR,
    ),
    (
        "ClientSSLError",
        lambda: aiohttp.ClientSSLError(_connection_key(), ssl.SSLError(1, "bad record")),
        Status.TLS_ERROR,
    ),
    (
        "ClientConnectorSSLError",
        lambda: aiohttp.ClientConnectorSSLError(_connection_key(), ssl.SSLError(1, "x")),
        Status.TLS_ERROR,
    ),
    (
        "ClientConnectorCertificateError",
        lambda: aiohttp.ClientConnectorCertificateError(_connection_key(), _cert_error()),
        Status.TLS_ERROR,
    ),
    ("ServerTimeoutError", lambda: aiohttp.ServerTimeoutError("read"), Status.TIMEOUT),
    ("ConnectionTimeoutError", lambda: aiohttp.ConnectionTimeoutError("conn"), Status.TIMEOUT),
    ("SocketTimeoutError", lambda: aiohttp.SocketTimeoutError("sock"), Status.TIMEOUT),
    ("ClientResponseError 400", lambda: _response_error(400), Status.INVALID_ARGUMENT),
    ("ClientResponseError 401", lambda: _response_error(401), Status.UNAUTHENTICATED),
    ("ClientResponseError 404", lambda: _response_error(404), Status.NOT_FOUND),
    ("ClientResponseError 429", lambda: _response_error(429), Status.THROTTLED),
    ("ClientResponseError 418", lambda: _response_error(418), Status.PERMANENT_ERROR),
    ("ClientResponseError 503", lambda: _response_error(503), Status.TEMPORARY_ERROR),
    ("ClientResponseError 200", lambda: _response_error(200), Status.INVALID_RESPONSE),
    ("ClientResponseError no status", lambda: _response_error(0), Status.HTTP_ERROR),
    ("ClientResponseError 600", lambda: _response_error(600), Status.HTTP_ERROR),
    (
        "ContentTypeError 200",
        lambda: aiohttp.ContentTypeError(_request_info(), (), status=200),
        Status.INVALID_RESPONSE,
    ),
    (
        "ContentTypeError 502",
        lambda: aiohttp.ContentTypeError(_request_info(), (), status=502),
        Status.TEMPORARY_ERROR,
    ),
    (
        "ClientConnectorError",
        lambda: aiohttp.ClientConnectorError(
            _connection_key(), ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        ),
        Status.TCP_ERROR,
    ),
    ("ClientConnectionError", lambda: aiohttp.ClientConnectionError("x"), Status.TCP_ERROR),
    ("ServerDisconnectedError", lambda: aiohttp.ServerDisconnectedError(), Status.TCP_ERROR),
    (
        "ClientConnectionResetError",
        lambda: aiohttp.ClientConnectionResetError("reset"),
        Status.TCP_ERROR,
    ),
    (
        "ClientOSError",
        lambda: aiohttp.ClientOSError(errno.ENOMEM, "no memory"),
        Status.TCP_ERROR,
    ),
    ("InvalidURL", lambda: aiohttp.InvalidURL("::nope"), Status.INVALID_ARGUMENT),
    (
        "NonHttpUrlClientError",
        lambda: aiohttp.NonHttpUrlClientError("ftp://x"),
        Status.INVALID_ARGUMENT,
    ),
    ("ClientPayloadError", lambda: aiohttp.ClientPayloadError("short"), Status.TEMPORARY_ERROR),
    ("ClientError", lambda: aiohttp.ClientError("other"), Status.TEMPORARY_ERROR),
    # sockets and TLS
    ("gaierror", lambda: socket.gaierror(socket.EAI_NONAME, "unknown"), Status.DNS_ERROR),
    ("herror", lambda: socket.herror(1, "host not found"), Status.DNS_ERROR),
    ("SSLError", lambda: ssl.SSLError(1, "bad record mac"), Status.TLS_ERROR),
    ("SSLEOFError", lambda: ssl.SSLEOFError(8, "eof"), Status.TLS_ERROR),
    ("CertificateError", lambda: ssl.CertificateError("hostname mismatch"), Status.TLS_ERROR),
    ("SSLCertVerificationError", _cert_error, Status.TLS_ERROR),
    # builtin OSError subclasses
    ("ConnectionError", lambda: ConnectionError("x"), Status.TCP_ERROR),
    ("ConnectionRefusedError", lambda: ConnectionRefusedError(), Status.TCP_ERROR),
    ("ConnectionResetError", lambda: ConnectionResetError(), Status.TCP_ERROR),
    ("BrokenPipeError", lambda: BrokenPipeError(), Status.TCP_ERROR),
    ("PermissionError", lambda: PermissionError("denied"), Status.PERMISSION_DENIED),
    ("FileNotFoundError", lambda: FileNotFoundError("missing"), Status.NOT_FOUND),
    ("InterruptedError", lambda: InterruptedError(), Status.TEMPORARY_ERROR),
    ("BlockingIOError", lambda: BlockingIOError(errno.EAGAIN, "again"), Status.TEMPORARY_ERROR),
    # OSError by errno (these numbers do not map to a builtin subclass)
    ("ENETDOWN", lambda: _os_error(errno.ENETDOWN), Status.TCP_ERROR),
    ("ENETUNREACH", lambda: _os_error(errno.ENETUNREACH), Status.TCP_ERROR),
    ("ENETRESET", lambda: _os_error(errno.ENETRESET), Status.TCP_ERROR),
    ("EHOSTDOWN", lambda: _os_error(errno.EHOSTDOWN), Status.TCP_ERROR),
    ("EHOSTUNREACH", lambda: _os_error(errno.EHOSTUNREACH), Status.TCP_ERROR),
    ("EADDRNOTAVAIL", lambda: _os_error(errno.EADDRNOTAVAIL), Status.TCP_ERROR),
    ("EMFILE", lambda: _os_error(errno.EMFILE), Status.TEMPORARY_ERROR),
    ("ENFILE", lambda: _os_error(errno.ENFILE), Status.TEMPORARY_ERROR),
    ("ENOBUFS", lambda: _os_error(errno.ENOBUFS), Status.TEMPORARY_ERROR),
    ("ENOMEM", lambda: _os_error(errno.ENOMEM), Status.TEMPORARY_ERROR),
    ("EIO (other errno)", lambda: _os_error(errno.EIO), Status.TEMPORARY_ERROR),
    ("OSError without errno", lambda: OSError("bare"), Status.TEMPORARY_ERROR),
    # errnos that Python turns into builtin subclasses
    ("ECONNREFUSED", lambda: _os_error(errno.ECONNREFUSED), Status.TCP_ERROR),
    ("ECONNRESET", lambda: _os_error(errno.ECONNRESET), Status.TCP_ERROR),
    ("ECONNABORTED", lambda: _os_error(errno.ECONNABORTED), Status.TCP_ERROR),
    ("EPIPE", lambda: _os_error(errno.EPIPE), Status.TCP_ERROR),
    ("ETIMEDOUT", lambda: _os_error(errno.ETIMEDOUT), Status.TIMEOUT),
    ("EPERM", lambda: _os_error(errno.EPERM), Status.PERMISSION_DENIED),
    ("EACCES", lambda: _os_error(errno.EACCES), Status.PERMISSION_DENIED),
    ("EAGAIN", lambda: _os_error(errno.EAGAIN), Status.TEMPORARY_ERROR),
    ("EINTR", lambda: _os_error(errno.EINTR), Status.TEMPORARY_ERROR),
    ("ENOENT", lambda: _os_error(errno.ENOENT), Status.NOT_FOUND),
    # other builtins
    ("EOFError", lambda: EOFError(), Status.TEMPORARY_ERROR),
    ("TypeError", lambda: TypeError("bad type"), Status.INVALID_ARGUMENT),
    ("ValueError", lambda: ValueError("bad value"), Status.INVALID_ARGUMENT),
    ("UnicodeDecodeError", lambda: b"\xff".decode(), Status.INVALID_ARGUMENT),
    ("KeyError", lambda: KeyError("k"), Status.PERMANENT_ERROR),
    ("IndexError", lambda: IndexError(0), Status.PERMANENT_ERROR),
    ("LookupError", lambda: LookupError("k"), Status.PERMANENT_ERROR),
    ("RuntimeError", lambda: RuntimeError("x"), Status.PERMANENT_ERROR),
    ("ZeroDivisionError", lambda: ZeroDivisionError(), Status.PERMANENT_ERROR),
    ("Exception", lambda: Exception(), Status.PERMANENT_ERROR),
    ("KeyboardInterrupt", lambda: KeyboardInterrupt(), Status.TEMPORARY_ERROR),
    # A process of the pool died or could not start: another may do
    ("BrokenProcessPool", lambda: BrokenProcessPool("died"), Status.TEMPORARY_ERROR),
    ("SystemExit", lambda: SystemExit(1), Status.PERMANENT_ERROR),
]


def _make(factory: Callable[[], BaseException | str]) -> BaseException:
    try:
        made = factory()
    except BaseException as exc:  # some exceptions are easiest to get by causing them
        return exc
    assert isinstance(made, BaseException)
    return made


@pytest.mark.parametrize(
    ("factory", "expected"),
    [pytest.param(f, s, id=name) for name, f, s in ERROR_CASES],
)
def test_default_error_rules(factory: Callable[[], BaseException], expected: Status) -> None:
    assert Classifier().status_for_error(_make(factory)) is expected


def test_timeout_alias_is_the_builtin() -> None:
    # Python 3.11 made asyncio.TimeoutError the builtin; the rule relies on that.
    assert asyncio.TimeoutError is TimeoutError


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (errors.DispatchError, Status.PERMANENT_ERROR),
        (errors.TemporaryError, Status.TEMPORARY_ERROR),
        (errors.PermanentError, Status.PERMANENT_ERROR),
        (errors.DispatchTimeoutError, Status.TIMEOUT),
        (errors.ThrottledError, Status.THROTTLED),
        (errors.InvalidArgumentError, Status.INVALID_ARGUMENT),
        (errors.InvalidResponseError, Status.INVALID_RESPONSE),
        (errors.IncompatibleStateError, Status.INCOMPATIBLE_STATE),
        (errors.DNSError, Status.DNS_ERROR),
        (errors.TCPError, Status.TCP_ERROR),
        (errors.TLSError, Status.TLS_ERROR),
        (errors.HTTPError, Status.HTTP_ERROR),
        (errors.UnauthenticatedError, Status.UNAUTHENTICATED),
        (errors.PermissionDeniedError, Status.PERMISSION_DENIED),
        (errors.NotFoundError, Status.NOT_FOUND),
        (errors.HostLoopError, Status.PERMANENT_ERROR),
    ],
)
def test_dispatch_errors_use_their_status(
    cls: type[errors.DispatchError], expected: Status
) -> None:
    assert Classifier().status_for_error(cls("x")) is expected


def test_dispatch_errors_with_other_constructors() -> None:
    classifier = Classifier()
    nondeterminism = errors.NondeterminismError("diverged", report="call a != call b")
    assert classifier.status_for_error(nondeterminism) is Status.INCOMPATIBLE_STATE
    assert classifier.status_for_error(errors.RemoteError("E", "m")) is Status.PERMANENT_ERROR
    config = errors.ConfigurationError("bad", variable="X", value="y")
    assert classifier.status_for_error(config) is Status.PERMANENT_ERROR


def test_dispatch_error_status_wins_over_builtin_base() -> None:
    # NotFoundError is a LookupError (PERMANENT by default) but reports NOT_FOUND;
    # InvalidResponseError is a ValueError (INVALID_ARGUMENT by default).
    classifier = Classifier()
    assert classifier.status_for_error(errors.NotFoundError("x")) is Status.NOT_FOUND
    assert classifier.status_for_error(errors.InvalidResponseError("x")) is (
        Status.INVALID_RESPONSE
    )
    assert classifier.status_for_error(errors.DNSError("x")) is Status.DNS_ERROR


def test_user_subclass_of_dispatch_error() -> None:
    class QuotaError(errors.ThrottledError):
        pass

    class Custom(errors.DispatchError):
        status = Status.NOT_FOUND

    class Broken(errors.DispatchError):
        status = Status.OK

    classifier = Classifier()
    assert classifier.status_for_error(QuotaError("x")) is Status.THROTTLED
    assert classifier.status_for_error(Custom("x")) is Status.NOT_FOUND
    assert classifier.status_for_error(Broken("x")) is Status.PERMANENT_ERROR


@pytest.mark.parametrize(
    ("code", "http_status", "expected"),
    [
        ("unavailable", 503, Status.TEMPORARY_ERROR),
        ("resource_exhausted", 429, Status.THROTTLED),
        ("unauthenticated", 401, Status.UNAUTHENTICATED),
        ("invalid_argument", 400, Status.INVALID_ARGUMENT),
        ("", 403, Status.PERMISSION_DENIED),
        ("", 502, Status.TEMPORARY_ERROR),
    ],
)
def test_client_error_status_follows_connect_code(
    code: str, http_status: int, expected: Status
) -> None:
    exc = errors.ClientError("msg", http_status=http_status, code=code)
    assert Classifier().status_for_error(exc) is expected


# --- registrations ----------------------------------------------------------------------


class _Base(Exception):
    pass


class _Child(_Base):
    pass


class _Grandchild(_Child):
    pass


def test_register_error_type_with_status() -> None:
    classifier = Classifier()
    assert classifier.status_for_error(_Base()) is Status.PERMANENT_ERROR
    classifier.register_error_type(_Base, Status.THROTTLED)
    assert classifier.status_for_error(_Base()) is Status.THROTTLED
    assert classifier.status_for_error(_Grandchild()) is Status.THROTTLED
    assert classifier.status_for_error(ValueError()) is Status.INVALID_ARGUMENT


def test_register_error_type_with_callable() -> None:
    class CodeError(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(code)
            self.code = code

    classifier = Classifier()
    classifier.register_error_type(CodeError, lambda e: status_for_http(e.code))
    assert classifier.status_for_error(CodeError(429)) is Status.THROTTLED
    assert classifier.status_for_error(CodeError(404)) is Status.NOT_FOUND


def test_most_derived_registration_wins() -> None:
    classifier = Classifier()
    classifier.register_error_type(_Base, Status.TIMEOUT)
    classifier.register_error_type(_Child, Status.NOT_FOUND)
    assert classifier.status_for_error(_Base()) is Status.TIMEOUT
    assert classifier.status_for_error(_Child()) is Status.NOT_FOUND
    assert classifier.status_for_error(_Grandchild()) is Status.NOT_FOUND


def test_registration_beats_builtin_and_dispatch_rules() -> None:
    classifier = Classifier()
    classifier.register_error_type(KeyError, Status.NOT_FOUND)
    classifier.register_error_type(errors.TemporaryError, Status.PERMANENT_ERROR)
    classifier.register_error_type(aiohttp.ClientConnectionError, Status.TEMPORARY_ERROR)
    assert classifier.status_for_error(KeyError("k")) is Status.NOT_FOUND
    assert classifier.status_for_error(errors.TemporaryError("x")) is Status.PERMANENT_ERROR
    assert classifier.status_for_error(aiohttp.ServerDisconnectedError()) is (
        Status.TEMPORARY_ERROR
    )


def test_reregistration_replaces() -> None:
    classifier = Classifier()
    classifier.register_error_type(_Base, Status.TIMEOUT)
    classifier.register_error_type(_Base, Status.THROTTLED)
    assert classifier.status_for_error(_Base()) is Status.THROTTLED


def test_unspecified_or_ok_from_registration_becomes_permanent() -> None:
    classifier = Classifier()
    classifier.register_error_type(_Base, Status.UNSPECIFIED)
    classifier.register_error_type(_Child, lambda e: Status.OK)
    assert classifier.status_for_error(_Base()) is Status.PERMANENT_ERROR
    assert classifier.status_for_error(_Child()) is Status.PERMANENT_ERROR


def test_raising_callable_falls_back_to_default_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(exc: BaseException) -> Status:
        raise RuntimeError("bug in the status function")

    classifier = Classifier()
    classifier.register_error_type(ConnectionResetError, broken)
    with caplog.at_level(logging.WARNING, logger="dispatch_aio._status"):
        status = classifier.status_for_error(ConnectionResetError())
    assert status is Status.TCP_ERROR
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "ConnectionResetError" in record.getMessage()
    assert record.exc_info is not None
    assert "bug in the status function" in str(record.exc_info[1])


def test_callable_returning_garbage_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    classifier = Classifier()
    classifier.register_error_type(_Base, lambda e: "nope")  # type: ignore[arg-type,return-value]
    with caplog.at_level(logging.WARNING, logger="dispatch_aio._status"):
        assert classifier.status_for_error(_Base()) is Status.PERMANENT_ERROR
    assert len(caplog.records) == 1


def test_register_accepts_proto_int() -> None:
    classifier = Classifier()
    classifier.register_error_type(_Base, status_pb2.STATUS_THROTTLED)  # type: ignore[arg-type]
    assert classifier.status_for_error(_Base()) is Status.THROTTLED


def test_register_validation() -> None:
    classifier = Classifier()
    with pytest.raises(TypeError, match="expects an exception class"):
        classifier.register_error_type(int, Status.TIMEOUT)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="expects an exception class"):
        classifier.register_error_type(ValueError(), Status.TIMEOUT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Status or a function"):
        classifier.register_error_type(_Base, "TIMEOUT")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot report success"):
        classifier.register_error_type(_Base, Status.OK)
    with pytest.raises(ValueError, match="not a Status value"):
        classifier.register_error_type(_Base, 99)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expects a class"):
        classifier.register_output_type("str", Status.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Status or a function"):
        classifier.register_output_type(str, None)  # type: ignore[arg-type]


def test_classifiers_do_not_share_registrations() -> None:
    first, second = Classifier(), Classifier()
    first.register_error_type(_Base, Status.THROTTLED)
    first.register_output_type(dict, Status.INVALID_RESPONSE)
    assert first.status_for_error(_Base()) is Status.THROTTLED
    assert second.status_for_error(_Base()) is Status.PERMANENT_ERROR
    assert first.status_for_output({}) is Status.INVALID_RESPONSE
    assert second.status_for_output({}) is Status.OK
    assert Classifier().status_for_error(_Base()) is Status.PERMANENT_ERROR


# --- outputs ----------------------------------------------------------------------------


def test_outputs_are_ok_by_default() -> None:
    classifier = Classifier()
    for value in (None, 0, "", [], {"a": 1}, ValueError("returned, not raised")):
        assert classifier.status_for_output(value) is Status.OK


def test_register_output_type() -> None:
    class Reply:
        def __init__(self, code: int) -> None:
            self.code = code

    class SpecialReply(Reply):
        pass

    classifier = Classifier()
    classifier.register_output_type(Reply, lambda r: status_for_http(r.code))
    classifier.register_output_type(SpecialReply, Status.THROTTLED)
    assert classifier.status_for_output(Reply(200)) is Status.OK
    assert classifier.status_for_output(Reply(503)) is Status.TEMPORARY_ERROR
    assert classifier.status_for_output(SpecialReply(200)) is Status.THROTTLED


def test_raising_output_callable_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    classifier = Classifier()
    classifier.register_output_type(dict, lambda d: Status(d["missing"]))
    with caplog.at_level(logging.WARNING, logger="dispatch_aio._status"):
        assert classifier.status_for_output({}) is Status.OK
    assert len(caplog.records) == 1


# --- against a real loopback server -----------------------------------------------------


@pytest.fixture
async def server_url() -> AsyncIterator[URL]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="body")

    app = web.Application()
    app.add_routes([web.get("/{code}", handler)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield URL.build(scheme="http", host="127.0.0.1", port=site.port)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (200, Status.OK),
        (204, Status.OK),
        (400, Status.INVALID_ARGUMENT),
        (404, Status.NOT_FOUND),
        (429, Status.THROTTLED),
        (500, Status.TEMPORARY_ERROR),
        (501, Status.PERMANENT_ERROR),
    ],
)
async def test_real_responses_and_errors(server_url: URL, code: int, expected: Status) -> None:
    classifier = Classifier()
    async with (
        aiohttp.ClientSession() as session,
        session.get(server_url / str(code)) as response,
    ):
        assert classifier.status_for_output(response) is expected
        if code >= 400:
            with pytest.raises(aiohttp.ClientResponseError) as info:
                response.raise_for_status()
            assert classifier.status_for_error(info.value) is expected


async def test_real_connection_refused() -> None:
    # Bind a port, then close it: connecting to it is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.get(f"http://127.0.0.1:{port}/")
    assert Classifier().status_for_error(info.value) is Status.TCP_ERROR
