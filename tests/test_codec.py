"""Values, inputs and errors survive the trip through their Dispatch wire forms."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import (
    any_pb2,
    duration_pb2,
    field_mask_pb2,
    json_format,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch_aio._codec import (
    PICKLED_TYPE_URL,
    CodecError,
    DecodeError,
    EncodeError,
    decode_error,
    decode_input,
    decode_value,
    encode_error,
    encode_input,
    encode_value,
    input_digest,
)
from dispatch_aio.errors import RemoteError
from dispatch_aio.proto.sdk.python.v1 import pickled_pb2
from dispatch_aio.proto.sdk.v1 import call_pb2, error_pb2

G = "type.googleapis.com/google.protobuf."


# --- helpers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int
    tags: list[object]


def same(a: object, b: object) -> bool:
    """Deep equality that also requires identical types; nan equals nan, -0.0 != 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        assert isinstance(b, float)
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return len(a) == len(b) and all(
            same(ka, kb) and same(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True)
        )
    if isinstance(a, datetime):
        assert isinstance(b, datetime)
        return (a, a.tzinfo, a.fold) == (b, b.tzinfo, b.fold)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def round_trip(value: object) -> object:
    return decode_value(any_pb2.Any.FromString(encode_value(value).SerializeToString()))


def pack(msg: Any, url: str | None = None) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    if url is not None:
        out.type_url = url
    return out


def any_of(url: str, payload: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=url, value=payload)


# --- strategies ----------------------------------------------------------------------------

offsets = st.timedeltas(
    min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
)
datetimes = st.datetimes(
    timezones=st.none() | st.just(UTC) | st.builds(timezone, offsets),
)
ints = st.integers() | st.integers(min_value=2**63 - 3, max_value=2**80) | st.just(-(2**63))
leaves = (
    st.none()
    | st.booleans()
    | ints
    | st.floats()
    | st.text()
    | st.binary()
    | datetimes
    | st.timedeltas()
)
hashables = (
    st.none() | st.booleans() | st.integers() | st.text() | st.binary() | st.floats(allow_nan=False)
)
calls = st.builds(
    lambda f, e, c: call_pb2.Call(function=f, endpoint=e, correlation_id=c),
    st.text(),
    st.text(),
    st.integers(min_value=0, max_value=2**64 - 1),
)


def _extend(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.builds(Point, st.integers(), st.lists(children, max_size=3))
    )


values = st.recursive(leaves | calls, _extend, max_leaves=12)


# --- values --------------------------------------------------------------------------------


@settings(deadline=None)
@given(values)
def test_values_round_trip(value: object) -> None:
    assert same(round_trip(value), value)


@settings(deadline=None)
@given(datetimes)
def test_datetimes_round_trip_with_their_timezone(value: datetime) -> None:
    back = round_trip(value)
    assert same(back, value)
    expected = (
        "Timestamp" if value.tzinfo is UTC and not value.fold else "dispatch.sdk.python.v1.Pickled"
    )
    assert encode_value(value).type_url.endswith(expected)


@settings(deadline=None)
@given(st.timedeltas())
def test_timedeltas_round_trip(value: timedelta) -> None:
    assert same(round_trip(value), value)


@settings(deadline=None)
@given(st.integers(), st.integers())
def test_closures_and_lambdas_run_after_decoding(n: int, x: int) -> None:
    def add(y: int) -> int:
        return y + n

    closure = round_trip(add)
    assert callable(closure)
    assert closure(x) == x + n
    lam = round_trip(lambda y: y * n)
    assert callable(lam)
    assert lam(x) == x * n


@pytest.mark.parametrize(
    ("value", "url"),
    [
        (None, G + "Empty"),
        (True, G + "BoolValue"),
        (False, G + "BoolValue"),
        (0, G + "Int64Value"),
        (2**63 - 1, G + "Int64Value"),
        (-(2**63), G + "Int64Value"),
        (2**63, PICKLED_TYPE_URL),
        (-(2**63) - 1, PICKLED_TYPE_URL),
        (1.5, G + "DoubleValue"),
        (math.inf, G + "DoubleValue"),
        (math.nan, G + "DoubleValue"),
        ("héllo", G + "StringValue"),
        ("\ud800", PICKLED_TYPE_URL),  # a lone surrogate is not UTF-8
        (b"\x00\xff", G + "BytesValue"),
        (pickle.dumps([1]), PICKLED_TYPE_URL),  # would read as a legacy pickle otherwise
        (datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), G + "Timestamp"),
        (datetime(2024, 5, 6, 7, 8, 9), PICKLED_TYPE_URL),
        (datetime(2024, 5, 6, tzinfo=timezone(timedelta(hours=2))), PICKLED_TYPE_URL),
        (datetime(2024, 5, 6, tzinfo=timezone(timedelta(0), "Z")), PICKLED_TYPE_URL),
        (datetime(2024, 5, 6, tzinfo=UTC, fold=1), PICKLED_TYPE_URL),
        (timedelta(days=-3, microseconds=7), G + "Duration"),
        (timedelta.max, PICKLED_TYPE_URL),  # beyond Duration's 10,000 years
        ([1, 2], PICKLED_TYPE_URL),
        ({"a": 1}, PICKLED_TYPE_URL),
        (Point(1, []), PICKLED_TYPE_URL),
        (
            call_pb2.Call(function="f"),
            "buf.build/stealthrocket/dispatch-proto/dispatch.sdk.v1.Call",
        ),
        (field_mask_pb2.FieldMask(paths=["a"]), G + "FieldMask"),
    ],
)
def test_encoded_form_and_round_trip(value: object, url: str) -> None:
    assert encode_value(value).type_url == url
    assert same(round_trip(value), value)


def test_subclasses_of_primitives_are_pickled_and_come_back_as_themselves() -> None:
    class Level(int):
        pass

    class Name(str):
        pass

    for value in (Level(3), Name("x")):
        assert encode_value(value).type_url == PICKLED_TYPE_URL
        assert type(round_trip(value)) is type(value)


def test_string_matches_the_protocol_test_vector() -> None:
    # The input of the RunRequest vector in PROTOCOL.md §4.3: Any(StringValue "World").
    expected = bytes.fromhex(
        "0a2f747970652e676f6f676c65617069732e636f6d2f676f6f676c652e70726f746f6275662e"
        "537472696e6756616c756512070a05576f726c64"
    )
    assert encode_value("World").SerializeToString() == expected
    assert decode_value(any_pb2.Any.FromString(expected)) == "World"


def test_timestamp_and_duration_fields() -> None:
    stamp = timestamp_pb2.Timestamp()
    encode_value(datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)).Unpack(stamp)
    assert (stamp.seconds, stamp.nanos) == (-1, 500_000_000)
    span = duration_pb2.Duration()
    encode_value(timedelta(microseconds=-1_500_000)).Unpack(span)
    assert (span.seconds, span.nanos) == (-1, -500_000_000)


# --- values from other SDKs ----------------------------------------------------------------


def test_any_prefix_resolves_by_last_segment() -> None:
    value = any_of("example.com/x/google.protobuf.Int64Value", b"\x08\x07")
    assert decode_value(value) == 7
    assert decode_value(any_of("google.protobuf.BoolValue", b"\x08\x01")) is True


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (wrappers_pb2.Int32Value(value=-5), -5),
        (wrappers_pb2.UInt32Value(value=2**32 - 1), 2**32 - 1),
        (wrappers_pb2.UInt64Value(value=2**64 - 1), 2**64 - 1),
        (wrappers_pb2.FloatValue(value=0.5), 0.5),
        (wrappers_pb2.BytesValue(value=b"raw"), b"raw"),
        (timestamp_pb2.Timestamp(seconds=1, nanos=1500), datetime(1970, 1, 1, 0, 0, 1, 1, UTC)),
        (duration_pb2.Duration(seconds=-2, nanos=-999), timedelta(seconds=-2)),
    ],
)
def test_well_known_values_from_other_sdks(msg: Any, expected: object) -> None:
    assert same(decode_value(pack(msg)), expected)


def test_decoded_timestamp_is_utc_aware() -> None:
    back = decode_value(pack(timestamp_pb2.Timestamp(seconds=0)))
    assert isinstance(back, datetime)
    assert back.tzinfo is UTC


def test_json_values_from_other_sdks_decode_with_float_numbers() -> None:
    doc: dict[str, object] = {"name": "x", "items": [1, 2.5, None, True, {"k": []}]}
    value = json_format.ParseDict(doc, struct_pb2.Value())
    back = decode_value(pack(value))
    assert same(back, {"items": [1.0, 2.5, None, True, {"k": []}], "name": "x"})
    struct = json_format.ParseDict({"b": 1, "a": "y"}, struct_pb2.Struct())
    assert same(decode_value(pack(struct)), {"a": "y", "b": 1.0})
    listed = struct_pb2.ListValue()
    listed.extend([1, "two"])
    assert same(decode_value(pack(listed)), [1.0, "two"])


def test_nested_any_decodes_up_to_the_depth_cap() -> None:
    value = encode_value("deep")
    for _ in range(7):  # 8 envelopes in all
        value = pack(value)
    assert decode_value(value) == "deep"
    with pytest.raises(DecodeError, match=r"nests google\.protobuf\.Any values more than 8"):
        decode_value(pack(value))


def test_other_known_messages_decode_as_messages() -> None:
    call = call_pb2.Call(function="f", input=encode_value(3))
    back = decode_value(pack(call))
    assert isinstance(back, call_pb2.Call)
    assert back == call


def test_legacy_bytes_value_holding_a_pickle() -> None:
    legacy = pack(wrappers_pb2.BytesValue(value=pickle.dumps({"a": [1, 2]})))
    assert same(decode_value(legacy), {"a": [1, 2]})
    # Bytes that only look like a pickle stay bytes.
    fake = b"\x80\x04not a pickle."
    assert decode_value(pack(wrappers_pb2.BytesValue(value=fake))) == fake


def test_pickle_looking_bytes_round_trip_as_bytes() -> None:
    data = pickle.dumps(object.__new__(Point), protocol=5)
    assert round_trip(data) == data


# --- inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "url"),
    [
        (None, G + "Empty"),
        (True, G + "BoolValue"),
        (-12, G + "Int64Value"),
        (0.25, G + "DoubleValue"),
        ("World", G + "StringValue"),
        (b"x", G + "BytesValue"),
        (datetime(2030, 1, 1, tzinfo=UTC), G + "Timestamp"),
        (timedelta(seconds=3), G + "Duration"),
        (
            call_pb2.Call(function="g"),
            "buf.build/stealthrocket/dispatch-proto/dispatch.sdk.v1.Call",
        ),
    ],
)
def test_single_primitive_input_is_sent_as_the_primitive(arg: object, url: str) -> None:
    encoded = encode_input((arg,), {}, function="f")
    assert encoded.type_url == url
    assert encoded == encode_value(arg)
    args, kwargs = decode_input(encoded)
    assert same(args, (arg,))
    assert kwargs == {}


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1, 2), {}),
        ((), {"name": "x"}),
        (("x",), {"n": 1}),
        (([1, 2],), {}),
        ((2**64,), {}),
        ((datetime(2024, 1, 1),), {}),
        ((((1,), {}),), {}),  # a single argument that looks like an (args, kwargs) pair
    ],
)
def test_other_inputs_are_pickled_pairs(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    encoded = encode_input(args, kwargs)
    assert encoded.type_url == PICKLED_TYPE_URL
    back_args, back_kwargs = decode_input(encoded)
    assert same(back_args, args)
    assert same(back_kwargs, kwargs)


@settings(deadline=None)
@given(st.lists(values, max_size=3), st.dictionaries(st.text(max_size=5), values, max_size=3))
def test_inputs_round_trip(args: list[object], kwargs: dict[str, object]) -> None:
    back_args, back_kwargs = decode_input(encode_input(tuple(args), kwargs))
    assert same(back_args, tuple(args))
    assert same(back_kwargs, kwargs)


def test_a_value_from_another_sdk_is_the_single_argument() -> None:
    value = json_format.ParseDict({"a": 1}, struct_pb2.Value())
    assert decode_input(pack(value)) == (({"a": 1.0},), {})


@contextlib.contextmanager
def dispatch_py_arguments() -> Iterator[type]:
    """Make pickle see a dataclass at dispatch.proto.Arguments, as dispatch-py defines it."""
    assert "dispatch" not in sys.modules, "dispatch-py must not be importable in these tests"

    @dataclasses.dataclass
    class Arguments:
        args: tuple[object, ...]
        kwargs: dict[str, object]

    Arguments.__module__ = "dispatch.proto"
    Arguments.__qualname__ = "Arguments"
    package = types.ModuleType("dispatch")
    proto = types.ModuleType("dispatch.proto")
    proto.Arguments = Arguments  # type: ignore[attr-defined]
    package.proto = proto  # type: ignore[attr-defined]
    sys.modules["dispatch"] = package
    sys.modules["dispatch.proto"] = proto
    try:
        yield Arguments
    finally:
        del sys.modules["dispatch.proto"]
        del sys.modules["dispatch"]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_dispatch_py_arguments_decode_without_dispatch_py(protocol: int) -> None:
    with dispatch_py_arguments() as arguments:
        data = pickle.dumps(arguments((1, "two"), {"three": [3]}), protocol=protocol)
    assert b"dispatch.proto" in data
    value = any_of(PICKLED_TYPE_URL, pickled_pb2.Pickled(pickled_value=data).SerializeToString())
    assert decode_input(value) == ((1, "two"), {"three": [3]})
    assert "dispatch" not in sys.modules


def test_legacy_dispatch_py_arguments_in_bytes_value() -> None:
    with dispatch_py_arguments() as arguments:
        data = pickle.dumps(arguments(("x",), {}))
    assert decode_input(pack(wrappers_pb2.BytesValue(value=data))) == (("x",), {})
    assert "dispatch" not in sys.modules


def test_dispatch_py_arguments_holding_no_arguments_is_an_error() -> None:
    with dispatch_py_arguments() as arguments:
        data = pickle.dumps(arguments(5, "nope"))
    value = any_of(PICKLED_TYPE_URL, pickled_pb2.Pickled(pickled_value=data).SerializeToString())
    with pytest.raises(DecodeError, match="Arguments hold args of type 'int'"):
        decode_input(value)


# --- errors on the way in and out -----------------------------------------------------------


def test_unknown_type_url() -> None:
    url = "buf.build/stealthrocket/coroutine/coroutine.v1.State"
    with pytest.raises(DecodeError, match=r"coroutine\.v1\.State.*import the module") as info:
        decode_value(any_of(url, b""))
    assert url in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, CodecError)
    with pytest.raises(DecodeError, match="names no message type"):
        decode_value(any_pb2.Any())


@pytest.mark.parametrize(
    ("url", "payload", "match"),
    [
        (G + "Int64Value", b"\x08", "payload is corrupt"),
        (G + "StringValue", b"\x0a\x01\xff", "payload is corrupt"),
        (G + "Any", b"\x12\x05ab", "payload is corrupt"),
        (PICKLED_TYPE_URL, b"\x0a\x03abc", "unpickling failed"),
        (
            PICKLED_TYPE_URL,
            pickled_pb2.Pickled(
                pickled_value=b"\x80\x04cno_such_module_xyz\nX\n."
            ).SerializeToString(),
            "ModuleNotFoundError",
        ),
        (G + "Timestamp", b"\x10\xff\xff\xff\xff\x0f", "nanos=-1"),
        (G + "Timestamp", timestamp_pb2.Timestamp(seconds=2**40).SerializeToString(), "years"),
        (G + "Duration", b"\x08\x01\x10\xff\xff\xff\xff\x0f", "different signs"),
        (G + "Duration", duration_pb2.Duration(seconds=10**12).SerializeToString(), "range"),
    ],
)
def test_corrupt_payloads(url: str, payload: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        decode_value(any_of(url, payload))
    assert repr(url) in str(info.value)


def test_generator_cannot_be_encoded() -> None:
    gen = (i for i in range(3))
    with pytest.raises(EncodeError) as info:
        encode_value(gen, context="the return value of function 'f'")
    text = str(info.value)
    assert text.startswith("cannot encode the return value of function 'f': object of type")
    assert "'generator'" in text
    assert isinstance(info.value, TypeError)


def test_lock_inside_a_list_names_the_type_and_where_it_is() -> None:
    with pytest.raises(EncodeError) as info:
        encode_value([1, {"k": threading.Lock()}])
    text = str(info.value)
    assert "cannot encode value: object of type 'list'" in text
    assert "'_thread.lock' at [1]['k']" in text


def test_unencodable_argument_is_named() -> None:
    with pytest.raises(EncodeError, match=r"^cannot encode argument 2 of function 'greet'") as info:
        encode_input(("ok", threading.Lock()), {}, function="greet")
    # One traceback: the pickling error is in the message, not chained as a cause.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "TypeError: cannot pickle '_thread.lock' object" in str(info.value)
    with pytest.raises(EncodeError, match=r"^cannot encode keyword argument 'lock' of function"):
        encode_input(("ok",), {"lock": Point(1, [threading.Lock()])}, function="greet")
    with pytest.raises(
        EncodeError, match=r"^cannot encode argument 1 of function 'g'.*\.tags\[0\]"
    ):
        encode_input((Point(1, [threading.Lock()]),), {}, function="g")


def test_input_digest() -> None:
    value = encode_value(None)
    assert input_digest(value) == hashlib.sha256(f"{G}Empty\x00".encode()).digest()
    assert input_digest(encode_value("a")) == input_digest(encode_value("a"))
    assert input_digest(any_of("a", b"bc")) != input_digest(any_of("ab", b"c"))


# --- exceptions ----------------------------------------------------------------------------


class PaymentError(Exception):
    pass


class Outer:
    class InnerError(Exception):
        pass


class LockedError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class CodeError(Exception):
    """Its __init__ needs two arguments but passes one message up: it does not unpickle."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")


class PairError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)


def raised(exc: BaseException) -> BaseException:
    def fail_here() -> None:
        raise exc

    try:
        fail_here()
    except BaseException as caught:
        return caught
    raise AssertionError


def wire(exc: BaseException) -> BaseException:
    return decode_error(error_pb2.Error.FromString(encode_error(exc).SerializeToString()))


def remote_notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", []) if n.startswith("Raised in the remote")]


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        KeyError("k"),
        PaymentError("declined", 42),
        Outer.InnerError("nested"),
        PairError(404, "missing"),
        ExceptionGroup("many", [ValueError("a"), PaymentError("b")]),
    ],
)
def test_exceptions_round_trip(exc: Exception) -> None:
    error = encode_error(raised(exc))
    assert error.type == type(exc).__qualname__
    assert error.message == str(exc)
    assert error.value
    assert b"fail_here" in error.traceback
    back = wire(exc)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert repr(back.args) == repr(exc.args)
    (note,) = remote_notes(back)
    assert "Traceback (most recent call last)" in note
    assert "fail_here" in note


def test_exception_with_unpicklable_attribute_becomes_remote_error() -> None:
    error = encode_error(raised(LockedError("stuck")))
    assert error.value == b""
    back = decode_error(error)
    assert isinstance(back, RemoteError)
    assert (back.type_name, back.message) == ("LockedError", "stuck")
    assert str(back) == "LockedError: stuck"
    assert remote_notes(back)


def test_exception_whose_init_takes_two_arguments() -> None:
    error = encode_error(raised(CodeError(404, "missing")))
    assert error.value == b""  # it pickles, but would not unpickle
    back = decode_error(error)
    assert isinstance(back, RemoteError)
    assert (back.type_name, back.message) == ("CodeError", "404: missing")


def test_exception_class_defined_in_a_function_round_trips() -> None:
    class LocalError(Exception):
        pass

    back = wire(LocalError("here"))
    assert type(back) is LocalError
    assert str(back) == "here"


def test_encode_error_never_raises() -> None:
    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    error = encode_error(BadStr())
    assert error.type.endswith("BadStr")
    assert "str() failed" in error.message
    surrogate = encode_error(ValueError("\ud800"))
    assert surrogate.message == "\\ud800"


@pytest.mark.parametrize("exc", [KeyboardInterrupt("stop"), asyncio.CancelledError("gone")])
def test_base_exceptions_are_not_rebuilt(exc: BaseException) -> None:
    back = wire(exc)
    assert isinstance(back, RemoteError)
    assert back.type_name == type(exc).__qualname__
    assert back.message == str(exc)
    assert any("not raised across calls" in n for n in back.__notes__)


def test_error_from_another_sdk() -> None:
    back = decode_error(error_pb2.Error(type="errorString", message="boom"))
    assert isinstance(back, RemoteError)
    assert str(back) == "errorString: boom"
    assert not getattr(back, "__notes__", [])


@pytest.mark.parametrize(
    ("value", "why"),
    [(b"garbage", "unpickling failed"), (pickle.dumps(42), "holds a 'int', not an exception")],
)
def test_error_value_that_does_not_rebuild(value: bytes, why: str) -> None:
    back = decode_error(error_pb2.Error(type="X", message="m", value=value, traceback=b"tb"))
    assert isinstance(back, RemoteError)
    assert (back.type_name, back.message) == ("X", "m")
    assert any(why in n for n in back.__notes__)
    assert remote_notes(back) == ["Raised in the remote function:\ntb"]
