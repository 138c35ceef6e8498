"""Python values <-> ``google.protobuf.Any``, function inputs, and exceptions <-> ``Error``.

Encoding picks a form by the *exact* type of a value, so that a round trip gives back a value
of the same type (an ``IntEnum`` member or a ``str`` subclass is pickled, not flattened):

===========================================  ===============================================
Python value                                 Wire form
===========================================  ===============================================
``None``                                     ``google.protobuf.Empty``
``bool``                                     ``google.protobuf.BoolValue``
``int`` within int64                         ``google.protobuf.Int64Value``
``float`` (nan and infinities included)      ``google.protobuf.DoubleValue``
``str`` (valid UTF-8)                        ``google.protobuf.StringValue``
``bytes``                                    ``google.protobuf.BytesValue``
``datetime`` with ``tzinfo=timezone.utc``    ``google.protobuf.Timestamp``
``timedelta`` within +-10,000 years          ``google.protobuf.Duration``
protobuf message                             the message itself
anything else                                ``dispatch.sdk.python.v1.Pickled`` (cloudpickle)
===========================================  ===============================================

Values that fit a well-known type only approximately are pickled instead, so they come back
identical: naive and non-UTC datetimes, ``fold=1`` datetimes, ints beyond int64, timedeltas
beyond the ``Duration`` range, strings with lone surrogates, and bytes that look like a
pickle (which the legacy ``BytesValue`` rule below would otherwise unpickle).

Decoding resolves the message by the text after the last ``/`` of the type URL, so every
SDK's prefix works. Well-known wrapper messages decode to the Python value they hold, as in
dispatch-py, so a ``StringValue`` *message* comes back as a ``str``. JSON-like
``google.protobuf.Value``/``Struct``/``ListValue`` payloads (sent by other SDKs) decode to
Python lists and dicts whose numbers are floats.

Classes and functions travel by reference whenever the reading process can import them by
name: those of importable modules, and those of the program's main script (``__main__``), which
the same program finds again when it resumes a call after a restart, a redeploy or on another
replica. So ``isinstance`` checks and ``except`` clauses see the program's own classes in every
process. Only what has no importable name (lambdas, and classes or functions defined inside
functions) is pickled by value, as a look-alike copy. A process that loads the main script
as a module registers it as ``__mp_main__``, as multiprocessing does, and ``__main__``
references resolve there too; ``dispatch-aio check app.py:dispatch`` and the fresh-process
test workers go further and load the script as ``__main__`` itself, so that values they make
pickle as the program's do.

Exceptions keep their chain: ``__cause__``, ``__context__`` and ``__notes__`` are pickled with
them (when they pickle; otherwise the exception travels without its chain).

Pickles are trusted input, as in every Python Dispatch SDK: they come from the scheduler the
endpoint authenticates, and unpickling runs code of the program that produced them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import cloudpickle
from google.protobuf import (
    any_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    message,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

from dispatch_aio import errors
from dispatch_aio.errors import RemoteError
from dispatch_aio.proto.sdk.python.v1 import pickled_pb2
from dispatch_aio.proto.sdk.v1 import error_pb2

__all__ = [
    "PICKLED_TYPE_URL",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "decode_error",
    "decode_input",
    "decode_value",
    "encode_error",
    "encode_input",
    "encode_value",
    "input_digest",
]

PICKLED_TYPE_URL = "buf.build/stealthrocket/dispatch-proto/dispatch.sdk.python.v1.Pickled"
"""Type URL of pickled Python values, as dispatch-py writes it."""

_GOOGLE_PREFIX = "type.googleapis.com/"
# dispatch-py packs the Dispatch messages with the prefix of their schema registry.
_DISPATCH_PREFIX = "buf.build/stealthrocket/dispatch-proto/"

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# google.protobuf.Duration allows +-10,000 years; Timestamp covers exactly datetime's range.
_DURATION_MAX_SECONDS = 315_576_000_000
_NANOS_PER_SECOND = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_M = typing.TypeVar("_M", bound=message.Message)

_MAX_ANY_DEPTH = 8
"""How many ``Any`` envelopes (the outer one included) a value may be wrapped in."""

_MAX_CULPRIT_DEPTH = 32
_MAX_CULPRIT_CHILDREN = 1000

_FIX = (
    "pass only values that pickle (no locks, open files, sockets, generators or running "
    "coroutines), or convert them to such values first"
)


# Public in dispatch_aio.errors, where users find them.
CodecError = errors.CodecError
EncodeError = errors.EncodeError
DecodeError = errors.DecodeError


# --------------------------------------------------------------------------------------------
# Encoding


def encode_value(value: object, *, context: str = "") -> any_pb2.Any:
    """Encode a Python value as a ``google.protobuf.Any``.

    Args:
        value: The value to encode.
        context: What the value is, for error messages (for example
            ``"the return value of function 'greet'"``).

    Returns:
        The encoded value; see the module documentation for the forms.

    Raises:
        EncodeError: The value is not a well-known type and cannot be pickled.
    """
    packed = _encode_well_known(value, context)
    if packed is not None:
        return packed
    return _pack(pickled_pb2.Pickled(pickled_value=_pickle(value, context)), context)


def encode_input(
    args: tuple[object, ...], kwargs: Mapping[str, object], *, function: str = ""
) -> any_pb2.Any:
    """Encode the arguments of a function call.

    A single positional argument of a well-known type is sent as that value, so that
    functions written with other SDKs (and people reading the scheduler's records) can
    read it. Any other arguments travel as a pickled ``(args, kwargs)`` pair; zero
    arguments are therefore a pickled ``((), {})``, whereas one ``None`` is an ``Empty``.

    Args:
        args: The positional arguments.
        kwargs: The keyword arguments.
        function: Name of the called function, for error messages.

    Returns:
        The encoded input.

    Raises:
        EncodeError: An argument cannot be encoded; the message names it.
    """
    of = f" of function {function!r}" if function else ""
    if len(args) == 1 and not kwargs:
        packed = _encode_well_known(args[0], f"argument 1{of}")
        if packed is not None:
            return packed
    pair = (tuple(args), dict(kwargs))
    try:
        data = _dumps(pair)
    except Exception as exc:
        # Point at the argument that fails rather than at the (args, kwargs) pair.
        named: list[tuple[str, object]] = [(f"argument {i}", a) for i, a in enumerate(args, 1)]
        named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
        for name, arg in named:
            try:
                _dumps(arg)
            except Exception as arg_exc:
                raise _pickle_error(arg, f"{name}{of}", arg_exc) from None
        raise _pickle_error(pair, f"the arguments{of}", exc) from None
    return _pack(pickled_pb2.Pickled(pickled_value=data), f"the arguments{of}")


def _encode_well_known(value: object, context: str) -> any_pb2.Any | None:
    """Encode ``value`` as a well-known type, or return None when it must be pickled."""
    kind = type(value)
    wrapped: message.Message
    if value is None:
        wrapped = empty_pb2.Empty()
    elif kind is bool:
        wrapped = wrappers_pb2.BoolValue(value=typing.cast(bool, value))
    elif kind is int:
        number = typing.cast(int, value)
        if not _INT64_MIN <= number <= _INT64_MAX:
            return None
        wrapped = wrappers_pb2.Int64Value(value=number)
    elif kind is float:
        wrapped = wrappers_pb2.DoubleValue(value=typing.cast(float, value))
    elif kind is str:
        try:
            wrapped = wrappers_pb2.StringValue(value=typing.cast(str, value))
        except UnicodeEncodeError:  # lone surrogates are not valid UTF-8
            return None
    elif kind is bytes:
        data = typing.cast(bytes, value)
        if _looks_like_pickle(data):
            return None
        wrapped = wrappers_pb2.BytesValue(value=data)
    elif kind is datetime:
        moment = typing.cast(datetime, value)
        if moment.tzinfo is not UTC or moment.fold:
            return None
        delta = moment - _EPOCH
        wrapped = timestamp_pb2.Timestamp(
            seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
        )
    elif kind is timedelta:
        duration = _to_duration(typing.cast(timedelta, value))
        if duration is None:
            return None
        wrapped = duration
    elif isinstance(value, message.Message):
        wrapped = value
    else:
        return None
    return _pack(wrapped, context)


def _to_duration(delta: timedelta) -> duration_pb2.Duration | None:
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    sign = -1 if micros < 0 else 1
    seconds, rest = divmod(abs(micros), 1_000_000)
    if seconds > _DURATION_MAX_SECONDS:
        return None
    # Duration wants seconds and nanos of the same sign.
    return duration_pb2.Duration(seconds=sign * seconds, nanos=sign * rest * 1000)


def _pack(msg: message.Message, context: str) -> any_pb2.Any:
    name = msg.DESCRIPTOR.full_name
    prefix = _DISPATCH_PREFIX if name.startswith("dispatch.sdk.") else _GOOGLE_PREFIX
    try:
        data = msg.SerializeToString(deterministic=True)
    except message.EncodeError as exc:  # e.g. a proto2 message missing required fields
        raise EncodeError(
            f"cannot encode {context or 'value'}: protobuf message {name!r} cannot be "
            f"serialized ({exc}); set its required fields first"
        ) from exc
    return any_pb2.Any(type_url=prefix + name, value=data)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, but ``__main__`` names by reference and exceptions with their chain.

    cloudpickle pickles every class and function of ``__main__`` by value, so a process that
    resumes a call would rebuild look-alike classes: ``isinstance`` and ``except`` would fail
    there. The main script's names are pickled by reference instead whenever they resolve to
    the object itself.
    """

    def __init__(self, file: io.BytesIO, *, chain: bool) -> None:
        super().__init__(file, protocol=cloudpickle.DEFAULT_PROTOCOL)
        self._chain = chain

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, io.IOBase) and not isinstance(obj, io.BytesIO | io.StringIO):
            # cloudpickle would snapshot a file's contents: the call would not get the file.
            name = getattr(obj, "name", None)
            raise TypeError(
                f"an open file{f' ({name!r})' if name is not None else ''} cannot be passed: "
                "pass its path, or its contents"
            )
        if isinstance(obj, type | types.FunctionType) and _is_main_name(obj):
            return NotImplemented  # pickle's own save_global: by reference
        if self._chain and isinstance(obj, BaseException):
            reduced = _reduce_with_chain(obj, self.proto)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)


def _is_main_name(obj: type | types.FunctionType) -> bool:
    """Whether ``obj`` is reachable as ``__main__.<its qualified name>``."""
    if obj.__module__ != "__main__":
        return False
    found: object = sys.modules.get("__main__")
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is obj


def _reduce_with_chain(exc: BaseException, protocol: int) -> tuple[object, ...] | None:
    """Reduce ``exc`` with its ``__cause__`` and ``__context__`` in its state.

    ``BaseException.__setstate__`` sets every item of a dict state as an attribute, so any
    unpickler (dispatch-py's included) restores the chain. Exceptions with their own
    pickling are left to it.
    """
    if exc.__cause__ is None and exc.__context__ is None:
        return None
    kind = type(exc)
    if kind.__setstate__ is not BaseException.__setstate__:
        return None
    reduced = exc.__reduce_ex__(protocol)
    if not isinstance(reduced, tuple) or len(reduced) not in (2, 3):
        return None
    state = reduced[2] if len(reduced) == 3 else None
    if state is not None and not isinstance(state, dict):
        return None
    state = dict(state or {})
    state["__cause__"] = exc.__cause__
    state["__context__"] = exc.__context__
    state["__suppress_context__"] = exc.__suppress_context__
    return (reduced[0], reduced[1], state)


def _dumps(value: object, *, chain: bool = True) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, chain=chain).dump(value)
    return buffer.getvalue()


def _pickle(value: object, context: str) -> bytes:
    try:
        return _dumps(value)
    except Exception as exc:
        raise _pickle_error(value, context, exc) from None


def _pickle_error(value: object, context: str, exc: Exception) -> EncodeError:
    """The error for a value that does not pickle, to raise ``from None``.

    Its message carries the pickling error, so the user sees one traceback, ending at
    their call (the pickling error stays in ``__context__``).
    """
    detail = f"{type(exc).__name__}: {exc}"
    culprit = _find_culprit(value, "", 0)
    if culprit is not None and culprit[0]:
        path, obj = culprit
        detail = f"it holds an object of type {_type_name(obj)!r} at {path}; {detail}"
    return EncodeError(
        f"cannot encode {context or 'value'}: object of type {_type_name(value)!r} "
        f"cannot be pickled ({detail}); {_FIX}"
    )


def _find_culprit(value: object, path: str, depth: int) -> tuple[str, object] | None:
    """Return the path to the innermost part of ``value`` that does not pickle.

    This runs only after a failure, so re-pickling the parts one by one is affordable.
    """
    if depth >= _MAX_CULPRIT_DEPTH:
        return None
    children: list[tuple[str, object]] = []
    if type(value) in (list, tuple):
        items = typing.cast("list[object] | tuple[object, ...]", value)
        children = [(f"[{i}]", item) for i, item in enumerate(items)]
    elif type(value) in (set, frozenset):
        members = typing.cast("set[object] | frozenset[object]", value)
        children = [(" (a set member)", member) for member in members]
    elif type(value) is dict:
        entries = typing.cast("dict[object, object]", value)
        for key, item in entries.items():
            children += [(f" (key {key!r})", key), (f"[{key!r}]", item)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [(f".{f.name}", getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    elif isinstance(getattr(value, "__dict__", None), dict) and not callable(value):
        attributes = typing.cast("dict[str, object]", value.__dict__)
        children = [(f".{name}", item) for name, item in attributes.items()]
    for suffix, child in children[:_MAX_CULPRIT_CHILDREN]:
        try:
            _dumps(child)
        except Exception:
            deeper = _find_culprit(child, path + suffix, depth + 1)
            return deeper if deeper is not None else (path + suffix, child)
    return None


def _type_name(value: object) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _looks_like_pickle(data: bytes) -> bool:
    """Whether ``data`` starts like a pickle of protocol 2 or later and ends with STOP."""
    return len(data) >= 4 and data[0] == 0x80 and 2 <= data[1] <= 5 and data[-1] == ord(".")


# --------------------------------------------------------------------------------------------
# Decoding


def decode_value(value: any_pb2.Any) -> object:
    """Decode a ``google.protobuf.Any`` into a Python value.

    Args:
        value: The encoded value, as written by this SDK, dispatch-py (current or legacy)
            or another Dispatch SDK.

    Returns:
        The decoded value. A dispatch-py ``dispatch.proto.Arguments`` object decodes to an
        internal stand-in; use :func:`decode_input` for function inputs.

    Raises:
        DecodeError: The type URL is unknown, the payload is corrupt, the pickle cannot be
            loaded here, or ``Any`` values are nested too deeply.
    """
    return _decode(value, 1)


def _decode(value: any_pb2.Any, depth: int) -> object:
    url = value.type_url
    name = url.rpartition("/")[2]
    if not name:
        raise DecodeError(
            f"cannot decode a value with type URL {url!r}: it names no message type; the "
            "value is empty or was not written by a Dispatch SDK"
        )
    decoder = _DECODERS.get(name)
    if decoder is not None:
        return decoder(value.value, url, depth)
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        raise DecodeError(
            f"cannot decode a value with type URL {url!r}: no protobuf message named "
            f"{name!r} is known here; import the module that defines it (its _pb2 module) "
            "before the value is decoded, or send a Python value or well-known type instead"
        ) from None
    return _parse(message_factory.GetMessageClass(descriptor), value.value, url)


def _parse(cls: type[_M], data: bytes, url: str) -> _M:
    try:
        return cls.FromString(data)
    except message.DecodeError as exc:
        raise DecodeError(
            f"cannot decode a value with type URL {url!r}: the payload is corrupt ({exc}); "
            "it was damaged in transit or storage, or its type URL does not match its content"
        ) from exc


def _decode_any(data: bytes, url: str, depth: int) -> object:
    if depth >= _MAX_ANY_DEPTH:
        raise DecodeError(
            f"cannot decode a value with type URL {url!r}: it nests google.protobuf.Any "
            f"values more than {_MAX_ANY_DEPTH} deep; send the inner value directly"
        )
    return _decode(_parse(any_pb2.Any, data, url), depth + 1)


def _decode_timestamp(data: bytes, url: str, depth: int) -> datetime:
    stamp = _parse(timestamp_pb2.Timestamp, data, url)
    if not 0 <= stamp.nanos < _NANOS_PER_SECOND:
        raise _invalid(url, f"nanos={stamp.nanos} is outside [0, 1e9)")
    try:
        # Sub-microsecond precision (from other SDKs) is truncated.
        return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)
    except OverflowError:
        raise _invalid(url, f"seconds={stamp.seconds} is outside years 1..9999") from None


def _decode_duration(data: bytes, url: str, depth: int) -> timedelta:
    span = _parse(duration_pb2.Duration, data, url)
    seconds, nanos = span.seconds, span.nanos
    if abs(seconds) > _DURATION_MAX_SECONDS or abs(nanos) >= _NANOS_PER_SECOND:
        raise _invalid(url, f"seconds={seconds}, nanos={nanos} is out of range")
    if seconds * nanos < 0:
        raise _invalid(url, f"seconds={seconds} and nanos={nanos} have different signs")
    total = seconds * _NANOS_PER_SECOND + nanos
    # Sub-microsecond precision (from other SDKs) is truncated toward zero.
    micros = abs(total) // 1000
    return timedelta(microseconds=-micros if total < 0 else micros)


def _invalid(url: str, why: str) -> DecodeError:
    return DecodeError(
        f"cannot decode a value with type URL {url!r}: {why}; the sender wrote an invalid "
        "well-known value"
    )


def _from_json(value: struct_pb2.Value) -> object:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _from_struct(value.struct_value)
    if kind == "list_value":
        return [_from_json(item) for item in value.list_value.values]
    return None  # null_value, or no kind set


def _from_struct(value: struct_pb2.Struct) -> dict[str, object]:
    # Sorted so that decoding is deterministic whatever the map order on the wire.
    return {key: _from_json(value.fields[key]) for key in sorted(value.fields)}


def _decode_bytes(data: bytes, url: str, depth: int) -> object:
    raw = _parse(wrappers_pb2.BytesValue, data, url).value
    if _looks_like_pickle(raw):
        # dispatch-py before mid-2024 sent every value as a pickle inside BytesValue.
        try:
            return _unpickle(raw, url)
        except DecodeError:
            pass
    return raw


def _decode_pickled(data: bytes, url: str, depth: int) -> object:
    return _unpickle(_parse(pickled_pb2.Pickled, data, url).pickled_value, url)


class _ForeignArguments:
    """Stand-in for dispatch-py's ``dispatch.proto.Arguments`` dataclass (args, kwargs).

    A dataclass pickles as "create the class without ``__init__``, then apply its state
    dict" (``NEWOBJ``/``copyreg._reconstructor`` followed by ``BUILD``), so this class only
    has to accept that state.
    """

    __slots__ = ("args", "kwargs")

    def __setstate__(self, state: object) -> None:
        fields: dict[object, object] = {}
        # (dict, slots dict) is how a slotted class pickles its state.
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if isinstance(part, dict):
                fields.update(part)
        self.args = fields.get("args")
        self.kwargs = fields.get("kwargs")


class _Unpickler(pickle.Unpickler):
    """Unpickler that loads dispatch-py's argument pickles without importing dispatch-py.

    It is not a sandbox: loading a pickle runs code named by it (see the module notes).
    """

    def find_class(self, module_name: str, global_name: str, /) -> typing.Any:
        if module_name == "dispatch.proto" and global_name == "Arguments":
            return _ForeignArguments
        if module_name == "__main__":
            return _find_main(global_name)
        return super().find_class(module_name, global_name)


def _find_main(qualname: str) -> object:
    """Resolve a name of the program's main script, also when it is loaded as a module."""
    for module_name in ("__main__", "__mp_main__"):
        found: object = sys.modules.get(module_name)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is not None:
            return found
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None) or "an interactive session"
    raise AttributeError(
        f"the value refers to {qualname!r} of the main script of the program that wrote it, "
        f"and this process's main script ({script}) has no such name; resume calls with the "
        f"same program, or define {qualname!r} in a module both programs import"
    )


def _unpickle(data: bytes, url: str) -> object:
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise DecodeError(
            f"cannot decode a value with type URL {url!r}: unpickling failed "
            f"({type(exc).__name__}: {exc}); the value was pickled by code that cannot be "
            "loaded here, so deploy the same code (modules, classes) and Python version on "
            "both sides, or send a value of a well-known type"
        ) from exc


def _decode_empty(data: bytes, url: str, depth: int) -> None:
    _parse(empty_pb2.Empty, data, url)  # still reject a corrupt payload


def _wrapper(cls: type[typing.Any]) -> Callable[[bytes, str, int], object]:
    def decode(data: bytes, url: str, depth: int) -> object:
        return typing.cast(object, _parse(cls, data, url).value)

    return decode


_DECODERS: Mapping[str, Callable[[bytes, str, int], object]] = MappingProxyType(
    {
        "google.protobuf.Empty": _decode_empty,
        "google.protobuf.BoolValue": _wrapper(wrappers_pb2.BoolValue),
        "google.protobuf.Int32Value": _wrapper(wrappers_pb2.Int32Value),
        "google.protobuf.Int64Value": _wrapper(wrappers_pb2.Int64Value),
        "google.protobuf.UInt32Value": _wrapper(wrappers_pb2.UInt32Value),
        "google.protobuf.UInt64Value": _wrapper(wrappers_pb2.UInt64Value),
        "google.protobuf.FloatValue": _wrapper(wrappers_pb2.FloatValue),
        "google.protobuf.DoubleValue": _wrapper(wrappers_pb2.DoubleValue),
        "google.protobuf.StringValue": _wrapper(wrappers_pb2.StringValue),
        "google.protobuf.BytesValue": _decode_bytes,
        "google.protobuf.Timestamp": _decode_timestamp,
        "google.protobuf.Duration": _decode_duration,
        "google.protobuf.Value": lambda data, url, depth: _from_json(
            _parse(struct_pb2.Value, data, url)
        ),
        "google.protobuf.Struct": lambda data, url, depth: _from_struct(
            _parse(struct_pb2.Struct, data, url)
        ),
        "google.protobuf.ListValue": lambda data, url, depth: [
            _from_json(item) for item in _parse(struct_pb2.ListValue, data, url).values
        ],
        "google.protobuf.Any": _decode_any,
        "dispatch.sdk.python.v1.Pickled": _decode_pickled,
    }
)


def decode_input(value: any_pb2.Any) -> tuple[tuple[object, ...], dict[str, object]]:
    """Decode the input of a function call into positional and keyword arguments.

    Accepts a pickled ``(args, kwargs)`` pair, dispatch-py's pickled
    ``dispatch.proto.Arguments``, or any other value, which becomes the single
    positional argument.

    Args:
        value: The encoded input.

    Returns:
        The positional and keyword arguments.

    Raises:
        DecodeError: The input cannot be decoded (see :func:`decode_value`), or a
            dispatch-py ``Arguments`` object holds something other than arguments.
    """
    decoded = decode_value(value)
    if isinstance(decoded, _ForeignArguments):
        args, kwargs = decoded.args, decoded.kwargs
        if not isinstance(args, tuple | list) or not _is_kwargs(kwargs):
            raise DecodeError(
                f"cannot decode the input with type URL {value.type_url!r}: its dispatch-py "
                f"Arguments hold args of type {_type_name(args)!r} and kwargs of type "
                f"{_type_name(kwargs)!r} instead of a tuple and a dict with str keys"
            )
        return tuple(args), dict(typing.cast("dict[str, object]", kwargs))
    if type(decoded) is tuple and len(decoded) == 2:
        args, kwargs = typing.cast("tuple[object, object]", decoded)
        if type(args) is tuple and _is_kwargs(kwargs):
            return typing.cast("tuple[object, ...]", args), typing.cast("dict[str, object]", kwargs)
    return (decoded,), {}


def _is_kwargs(value: object) -> bool:
    return type(value) is dict and all(type(key) is str for key in value)


def input_digest(value: any_pb2.Any) -> bytes:
    """Return a SHA-256 digest identifying an encoded value, the same in every process.

    The digest covers the type URL and the payload. A pickle holding a ``set`` or
    ``frozenset`` lists the members in the order of their hashes, which for strings and
    bytes differs from process to process (``PYTHONHASHSEED``); such values are digested
    in a canonical form instead, so equal values give equal digests wherever they are
    encoded.

    Args:
        value: The encoded value.

    Returns:
        32 bytes; equal for equal type URLs and payloads.
    """
    digest = hashlib.sha256(value.type_url.encode("utf-8"))
    digest.update(b"\x00")
    payload = value.value
    if value.type_url.endswith("/dispatch.sdk.python.v1.Pickled"):
        canonical = _canonical_pickle(payload)
        if canonical is not None:
            digest.update(b"canonical\x00")
            payload = canonical
    digest.update(payload)
    return digest.digest()


# Opcodes of pickle protocol 4 and later that build sets; a payload without either byte
# holds no set (one with them may still hold none: the bytes can occur inside data).
_SET_OPCODES = (pickle.EMPTY_SET, pickle.FROZENSET)


def _canonical_pickle(payload: bytes) -> bytes | None:
    """Return a canonical form of a pickled value that may hold sets, else None."""
    try:
        data = pickled_pb2.Pickled.FromString(payload).pickled_value
    except message.DecodeError:
        return None
    if not any(opcode in data for opcode in _SET_OPCODES):
        return None
    try:
        value = _Unpickler(io.BytesIO(data)).load()
    except Exception:
        return None
    out: list[bytes] = []
    _canonical(value, out, {})
    return b"".join(out)


def _canonical(value: object, out: list[bytes], seen: dict[int, int]) -> None:
    """Append a serialization of ``value`` that does not depend on hash order.

    Sets and dicts are written sorted by their members' own serializations (dict equality
    ignores order too); other objects by their pickle reduction, with classes and
    functions by name.
    """
    kind = type(value)
    if value is None or kind in (bool, int, float, complex, str, bytes):
        out.append(f"{kind.__name__}:{value!r};".encode("utf-8", "backslashreplace"))
        return
    if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
        name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
        out.append(f"global:{name};".encode("utf-8", "backslashreplace"))
        return
    if id(value) in seen:  # a cycle, or a value shared by several parts
        out.append(f"ref:{seen[id(value)]};".encode())
        return
    seen[id(value)] = len(seen)
    if kind in (list, tuple):
        out.append(f"{kind.__name__}[".encode())
        for item in typing.cast("list[object] | tuple[object, ...]", value):
            _canonical(item, out, seen)
        out.append(b"]")
    elif kind in (set, frozenset, dict):
        pairs = typing.cast(
            "list[tuple[object, object]]",
            list(typing.cast("dict[object, object]", value).items())
            if kind is dict
            else [(member, None) for member in typing.cast("set[object]", value)],
        )
        parts = []
        for key, item in pairs:
            part: list[bytes] = []
            _canonical(key, part, dict(seen))
            if kind is dict:
                _canonical(item, part, dict(seen))
            parts.append(b"".join(part))
        out.append(f"{kind.__name__}{{".encode())
        out.extend(sorted(parts))
        out.append(b"}")
    else:
        try:
            reduced = value.__reduce_ex__(4)
        except Exception:
            reduced = repr(value)
        out.append(b"object(")
        _canonical(reduced if isinstance(reduced, str) else _materialize(reduced), out, seen)
        out.append(b")")


def _materialize(reduced: object) -> object:
    """Turn the iterators of a pickle reduction (list and dict items) into lists."""
    if not isinstance(reduced, tuple):
        return reduced
    return tuple(list(part) if isinstance(part, typing.Iterator) else part for part in reduced)


# --------------------------------------------------------------------------------------------
# Errors


def encode_error(exc: BaseException) -> error_pb2.Error:
    """Encode an exception as a ``dispatch.sdk.v1.Error``; never raises.

    ``value`` holds the cloudpickled exception only when it also unpickles back to the same
    type (exceptions whose ``__init__`` takes other arguments than they pass to
    ``BaseException.__init__`` often do not), so the receiver can always either rebuild
    the exception or fall back to a stand-in built from ``type`` and ``message``.

    Args:
        exc: The exception.

    Returns:
        The error, with the class ``__qualname__`` as ``type``, ``str(exc)`` as
        ``message`` and the formatted traceback (UTF-8) as ``traceback``.
    """
    kind = type(exc)
    try:
        message_text = str(exc)
    except Exception:
        message_text = f"<{kind.__qualname__} object: str() failed>"
    try:
        trace = "".join(traceback.format_exception(exc))
    except Exception:
        trace = ""
    return error_pb2.Error(
        type=_valid_utf8(kind.__qualname__),
        message=_valid_utf8(message_text),
        value=_pickle_exception(exc),
        traceback=trace.encode("utf-8", "backslashreplace"),
    )


def _pickle_exception(exc: BaseException) -> bytes:
    # With its chain if the chain pickles, else without it rather than not at all.
    for chain in (True, False):
        try:
            data = _dumps(exc, chain=chain)
            restored = _Unpickler(io.BytesIO(data)).load()
        except Exception:
            continue
        return data if type(restored) is type(exc) else b""
    return b""


def _valid_utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Errors a scheduler writes for a call that ended without an exception of its own (it
# expired, or its function answered a bare status) have the status's name as their type;
# they are rebuilt as the class of that status, so ``except TimeoutError`` catches an
# expired call.
_STATUS_ERRORS: Mapping[str, type[errors.DispatchError]] = MappingProxyType(
    {
        cls.status.proto_name: cls
        for cls in (
            errors.TemporaryError,
            errors.PermanentError,
            errors.DispatchTimeoutError,
            errors.ThrottledError,
            errors.InvalidArgumentError,
            errors.InvalidResponseError,
            errors.IncompatibleStateError,
            errors.DNSError,
            errors.TCPError,
            errors.TLSError,
            errors.HTTPError,
            errors.UnauthenticatedError,
            errors.PermissionDeniedError,
            errors.NotFoundError,
        )
    }
    | {errors.CancelledCallError.error_type: errors.CancelledCallError}
)


def decode_error(error: error_pb2.Error) -> BaseException:
    """Rebuild the exception described by a ``dispatch.sdk.v1.Error``; never raises.

    The pickled exception in ``value`` is returned when it loads here and is an
    ``Exception``. Otherwise (no value, as from other-language SDKs, a value that does not
    load, or a ``BaseException`` such as ``CancelledError`` or ``KeyboardInterrupt``, which
    must not be raised into the caller's own control flow) the result is a
    :class:`~dispatch_aio.errors.RemoteError` with the remote type name and message, except
    for an error without a value whose type is a status name (``STATUS_TIMEOUT``, as a
    scheduler writes for an expired call): that is rebuilt as the `errors` class of the
    status (`errors.DispatchTimeoutError`, a ``TimeoutError``). The remote traceback, when
    present, is attached as a note.

    Args:
        error: The error received from the remote side.

    Returns:
        The exception to raise to the caller.
    """
    rebuilt: BaseException | None = None
    problem = ""
    if error.value:
        try:
            loaded = _unpickle(error.value, f"{error.type} (Error.value)")
        except DecodeError as exc:
            problem = str(exc)
        else:
            if isinstance(loaded, Exception):
                rebuilt = loaded
            elif isinstance(loaded, BaseException):
                problem = f"{type(loaded).__qualname__} is not raised across calls"
            else:
                problem = f"Error.value holds a {_type_name(loaded)!r}, not an exception"
    if rebuilt is None and not error.value and error.type in _STATUS_ERRORS:
        rebuilt = _STATUS_ERRORS[error.type](error.message)
    if rebuilt is None:
        rebuilt = RemoteError(error.type, error.message)
        if problem:
            rebuilt.add_note(f"The original exception was not rebuilt: {problem}")
    if error.traceback:
        text = error.traceback.decode("utf-8", "replace").rstrip()
        rebuilt.add_note(f"Raised in the remote function:\n{text}")
    return rebuilt
