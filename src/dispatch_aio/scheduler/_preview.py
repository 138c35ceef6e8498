"""Text previews of call values for the web UI, made without running any of their code.

The scheduler never unpickles: a pickle is a program, and loading one imports modules and
calls whatever it names. `preview_pickle` reads a pickle's opcodes with
`pickletools.genops` instead and rebuilds only what needs no code: None, bools, numbers,
str, bytes, and lists, tuples, dicts and sets of those. Anything else (an instance, a
class, a function, a call to a reducer) becomes a stand-in that shows the name the pickle
gives it and what would have been passed to it, such as ``<Point(1, 2)>``; nothing it
names is imported or called. Well-known protobuf values (``StringValue``, ``Timestamp``
...) are parsed as messages, which runs no application code either.

Previews are bounded: the text is cut at a size limit, containers are shown to a fixed
depth, and a pickle whose rebuilt values would share or repeat parts is never expanded
further than the text allows.
"""

from __future__ import annotations

__all__ = ["preview_error_value", "preview_input", "preview_pickle", "preview_value"]

import contextlib
import pickletools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from google.protobuf import (
    any_pb2,
    duration_pb2,
    empty_pb2,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import DecodeError, Message

from ..proto.sdk.python.v1 import pickled_pb2

_PICKLED = "dispatch.sdk.python.v1.Pickled"
_MAX_DEPTH = 12
_MAX_INT_DIGITS = 1000
DEFAULT_LIMIT = 4000
_OPS_PER_CHAR = 50
"""Opcodes read per character of the limit: a preview of a bigger pickle shows the start
of its value, rebuilt from the opcodes read (a preview must be cheap)."""
_MIN_OPS = 10_000

_SCALARS: dict[str, type[Message]] = {
    "google.protobuf.BoolValue": wrappers_pb2.BoolValue,
    "google.protobuf.Int32Value": wrappers_pb2.Int32Value,
    "google.protobuf.Int64Value": wrappers_pb2.Int64Value,
    "google.protobuf.UInt32Value": wrappers_pb2.UInt32Value,
    "google.protobuf.UInt64Value": wrappers_pb2.UInt64Value,
    "google.protobuf.FloatValue": wrappers_pb2.FloatValue,
    "google.protobuf.DoubleValue": wrappers_pb2.DoubleValue,
    "google.protobuf.StringValue": wrappers_pb2.StringValue,
    "google.protobuf.BytesValue": wrappers_pb2.BytesValue,
}


# -- rebuilt values ---------------------------------------------------------------------
#
# Lists are Python lists (APPEND mutates them, as in a real unpickler) and tuples are
# tuples; dicts and sets are kept as lists of entries, so that keys need not be hashable
# here (a key may be a stand-in, or a list a real unpickler would have refused).


class _Dict:
    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[object, object]] = []


class _Set:
    __slots__ = ("frozen", "items")

    def __init__(self, items: list[object], *, frozen: bool) -> None:
        self.items = items
        self.frozen = frozen


class _Global:
    """A class or function the pickle names (``module.qualname``); never imported."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def short(self) -> str:
        return self.name.rpartition(".")[2] or self.name


class _Object:
    """What calling `func` with `args` would have made; `state` is what BUILD would set."""

    __slots__ = ("args", "func", "kwargs", "state")

    def __init__(self, func: object, args: object = (), kwargs: object = None) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.state: list[object] = []


class _Opaque:
    """Something the reader cannot show at all (a persistent id, an out-of-band buffer)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class _Mark:
    __slots__ = ()


_MARK = _Mark()


class _Unreadable(Exception):
    """The pickle is damaged or uses the stack in a way no unpickler would accept."""


class _TooBig(Exception):
    """The pickle has more opcodes than a preview reads; `partial` is what was rebuilt."""

    def __init__(self, partial: object) -> None:
        super().__init__("too many opcodes")
        self.partial = partial


class _Partial:
    """The start of a value whose pickle was not read to the end."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


# Reducers whose result is a plain container of their argument: rebuilt as that
# container rather than shown as a call (protocol 2 pickles sets this way).
_CONTAINERS = frozenset(
    f"{module}.{kind}"
    for module in ("builtins", "__builtin__")  # protocols 0 to 2 name the Python 2 module
    for kind in ("set", "frozenset", "list", "tuple", "dict")
)
_RECONSTRUCTORS = frozenset({"copyreg._reconstructor", "copy_reg._reconstructor"})
_NEWOBJ = frozenset({"copyreg.__newobj__", "copy_reg.__newobj__"})


def _pop_mark(stack: list[object], marks: list[int]) -> list[object]:
    if not marks:
        raise _Unreadable("no MARK on the stack")
    at = marks.pop()
    items = stack[at:]
    del stack[at:]
    return items


def _pop(stack: list[object]) -> object:
    if not stack:
        raise _Unreadable("stack underflow")
    return stack.pop()


def _top(stack: list[object]) -> object:
    if not stack:
        raise _Unreadable("stack underflow")
    return stack[-1]


def _pairs(items: list[object]) -> Iterator[tuple[object, object]]:
    if len(items) % 2:
        raise _Unreadable("odd number of items for a dict")
    return zip(items[::2], items[1::2], strict=True)


def _reduce(func: object, args: object) -> object:
    if isinstance(func, _Global) and func.name in _CONTAINERS and isinstance(args, tuple):
        items = _items(args[0]) if len(args) == 1 else [] if not args else None
        if items is not None:
            kind = func.name.rpartition(".")[2]
            if kind in ("set", "frozenset"):
                return _Set(items, frozen=kind == "frozenset")
            if kind == "list":
                return list(items)
            if kind == "tuple":
                return tuple(items)
            if all(isinstance(item, tuple) and len(item) == 2 for item in items):
                built = _Dict()
                built.items.extend(items)  # type: ignore[arg-type]
                return built
    if (
        isinstance(func, _Global)
        and func.name == "_codecs.encode"
        and isinstance(args, tuple)
        and len(args) == 2
        and isinstance(args[0], str)
        and args[1] == "latin1"
    ):
        # How protocols 0 to 2 write bytes; encoding a str here runs none of the pickle's code.
        return args[0].encode("latin-1", "replace")
    return _Object(func, args)


def _items(value: object) -> list[object] | None:
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, _Set):
        return list(value.items)
    if isinstance(value, _Dict):
        return [key for key, _ in value.items]
    return None


def _read(data: bytes, max_ops: int) -> object:
    """Run the pickle's opcodes on a stack of rebuilt values; return what STOP returns."""
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
        if count >= max_ops:
            # The outermost value is at the bottom of the stack, filled in so far.
            raise _TooBig(stack[0] if stack and stack[0] is not _MARK else None)
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return _pop(stack)
        if name == "MARK":
            marks.append(len(stack))
        elif name == "POP":
            if marks and marks[-1] == len(stack):
                marks.pop()  # POP of a MARK that is on top
            else:
                _pop(stack)
        elif name == "POP_MARK":
            _pop_mark(stack, marks)
        elif name == "DUP":
            stack.append(_top(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = _top(stack)  # type: ignore[index]
        elif name == "MEMOIZE":
            memo[len(memo)] = _top(stack)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if not isinstance(arg, int) or arg not in memo:
                raise _Unreadable(f"memo key {arg} is not set")
            stack.append(memo[arg])
        elif name == "NONE":
            stack.append(None)
        elif name == "NEWTRUE":
            stack.append(True)
        elif name == "NEWFALSE":
            stack.append(False)
        elif name in (
            "INT",
            "BININT",
            "BININT1",
            "BININT2",
            "LONG",
            "LONG1",
            "LONG4",
            "FLOAT",
            "BINFLOAT",
            "UNICODE",
            "BINUNICODE",
            "SHORT_BINUNICODE",
            "BINUNICODE8",
            "BINBYTES",
            "SHORT_BINBYTES",
            "BINBYTES8",
        ):
            stack.append(arg)  # genops decoded it: int (or bool for INT 00/01), float ...
        elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            # Python 2 str; Python 3 loads it as text by default.
            stack.append(arg if isinstance(arg, str) else bytes(arg).decode("latin-1"))  # type: ignore[arg-type]
        elif name == "BYTEARRAY8":
            stack.append(_Object(_Global("builtins.bytearray"), (bytes(arg),)))  # type: ignore[arg-type]
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "EMPTY_DICT":
            stack.append(_Dict())
        elif name == "EMPTY_SET":
            stack.append(_Set([], frozen=False))
        elif name == "LIST":
            stack.append(_pop_mark(stack, marks))
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack, marks)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            size = int(name[-1])
            if len(stack) < size:
                raise _Unreadable("stack underflow")
            items = stack[-size:]
            del stack[-size:]
            stack.append(tuple(items))
        elif name == "DICT":
            built = _Dict()
            built.items.extend(_pairs(_pop_mark(stack, marks)))
            stack.append(built)
        elif name == "FROZENSET":
            stack.append(_Set(_pop_mark(stack, marks), frozen=True))
        elif name == "APPEND":
            item = _pop(stack)
            _append(_top(stack), [item])
        elif name == "APPENDS":
            items = _pop_mark(stack, marks)
            _append(_top(stack), items)
        elif name == "SETITEM":
            value = _pop(stack)
            key = _pop(stack)
            _setitems(_top(stack), [(key, value)])
        elif name == "SETITEMS":
            pairs = list(_pairs(_pop_mark(stack, marks)))  # before _top: it is below them
            _setitems(_top(stack), pairs)
        elif name == "ADDITEMS":
            items = _pop_mark(stack, marks)
            target = _top(stack)
            if not isinstance(target, _Set):
                raise _Unreadable("ADDITEMS on something that is not a set")
            target.items.extend(items)
        elif name == "GLOBAL":
            module, _, qualname = str(arg).partition(" ")
            stack.append(_Global(f"{module}.{qualname}"))
        elif name == "STACK_GLOBAL":
            top = _pop(stack)
            below = _pop(stack)
            stack.append(_Global(f"{below}.{top}"))
        elif name == "INST":
            module, _, qualname = str(arg).partition(" ")
            stack.append(_Object(_Global(f"{module}.{qualname}"), tuple(_pop_mark(stack, marks))))
        elif name == "OBJ":
            items = _pop_mark(stack, marks)
            if not items:
                raise _Unreadable("OBJ without a class")
            stack.append(_Object(items[0], tuple(items[1:])))
        elif name == "REDUCE":
            args = _pop(stack)
            func = _pop(stack)
            stack.append(_reduce(func, args))
        elif name == "NEWOBJ":
            args = _pop(stack)
            cls = _pop(stack)
            stack.append(_Object(cls, args))
        elif name == "NEWOBJ_EX":
            kwargs = _pop(stack)
            args = _pop(stack)
            cls = _pop(stack)
            stack.append(_Object(cls, args, kwargs))
        elif name == "BUILD":
            state = _pop(stack)
            target = _top(stack)
            if isinstance(target, _Object):
                target.state.append(state)
        elif name in ("PERSID", "BINPERSID"):
            if name == "BINPERSID":
                _pop(stack)
            stack.append(_Opaque("persistent reference"))
        elif name in ("EXT1", "EXT2", "EXT4"):
            stack.append(_Opaque(f"extension code {arg}"))
        elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
            if name == "NEXT_BUFFER":
                stack.append(_Opaque("out-of-band buffer"))
        else:
            raise _Unreadable(f"unknown opcode {name}")
    raise _Unreadable("no STOP opcode")


def _append(target: object, items: list[object]) -> None:
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, _Object):
        target.state.append(items)  # an object's extend(): shown as part of its state
    else:
        raise _Unreadable("APPEND on something that is not a list")


def _setitems(target: object, items: list[tuple[object, object]]) -> None:
    if isinstance(target, _Dict):
        target.items.extend(items)
    elif isinstance(target, _Object):
        built = _Dict()
        built.items.extend(items)
        target.state.append(built)
    else:
        raise _Unreadable("SETITEM on something that is not a dict")


# -- rendering ---------------------------------------------------------------------------


class _Full(Exception):
    """The text reached its limit."""


class _Writer:
    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.active: set[int] = set()  # ids of the containers being written: cycles

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.limit and self.size > self.limit:
            raise _Full

    def text(self) -> str:
        text = "".join(self.parts)
        if self.limit and len(text) > self.limit:
            return text[: max(self.limit - 3, 1)] + "..."
        return text


def _write(out: _Writer, value: object, depth: int) -> None:
    if value is None or isinstance(value, bool | float | str | bytes):
        out.write(repr(value))
    elif isinstance(value, int):
        out.write(_int(value))
    elif isinstance(value, _Global):
        out.write(f"<{value.name}>")
    elif isinstance(value, _Opaque):
        out.write(f"<{value.what}>")
    elif isinstance(value, _Partial):
        _write(out, value.value, depth)
        out.write(" ...")
    elif depth >= _MAX_DEPTH:
        out.write("...")
    elif id(value) in out.active:
        out.write("<...>")  # a container that holds itself
    else:
        out.active.add(id(value))
        try:
            _write_container(out, value, depth + 1)
        finally:
            out.active.discard(id(value))


def _write_container(out: _Writer, value: object, depth: int) -> None:
    if isinstance(value, list):
        _write_items(out, "[", value, "]", depth)
    elif isinstance(value, tuple):
        _write_items(out, "(", value, ",)" if len(value) == 1 else ")", depth)
    elif isinstance(value, _Set):
        if not value.items:
            out.write("frozenset()" if value.frozen else "set()")
            return
        opening, closing = ("frozenset({", "})") if value.frozen else ("{", "}")
        _write_items(out, opening, value.items, closing, depth)
    elif isinstance(value, _Dict):
        out.write("{")
        for i, (key, item) in enumerate(value.items):
            if i:
                out.write(", ")
            _write(out, key, depth)
            out.write(": ")
            _write(out, item, depth)
        out.write("}")
    elif isinstance(value, _Object):
        _write_object(out, value, depth)
    else:
        out.write(f"<{type(value).__name__}>")


def _write_items(
    out: _Writer, opening: str, items: list[object] | tuple[object, ...], closing: str, depth: int
) -> None:
    out.write(opening)
    for i, item in enumerate(items):
        if i:
            out.write(", ")
        _write(out, item, depth)
    out.write(closing)


def _write_object(out: _Writer, value: _Object, depth: int) -> None:
    func = value.func
    args = value.args
    if isinstance(func, _Global) and func.name in _NEWOBJ and isinstance(args, tuple):
        func, args = (args[0], args[1:]) if args else (func, args)
    reconstructor = isinstance(func, _Global) and func.name in _RECONSTRUCTORS
    if reconstructor and isinstance(args, tuple) and args:
        func, args = args[0], ()
    name = func.short if isinstance(func, _Global) else "object"
    out.write(f"<{name}(")
    first = True
    if isinstance(args, tuple):
        for arg in args:
            if not first:
                out.write(", ")
            first = False
            _write(out, arg, depth)
    else:
        _write(out, args, depth)
        first = False
    if isinstance(value.kwargs, _Dict):
        for key, item in value.kwargs.items:
            if not first:
                out.write(", ")
            first = False
            out.write(f"{key}=" if isinstance(key, str) else "")
            _write(out, item, depth)
    for state in value.state:
        first = _write_state(out, state, depth, first)
    out.write(")>")


def _write_state(out: _Writer, state: object, depth: int, first: bool) -> bool:
    # __setstate__ data: a dict of attributes is shown as keywords, as a dataclass repr.
    slots: object = None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], _Dict | None):
        state, slots = state
    for part in (state, slots):
        if part is None:
            continue
        if isinstance(part, _Dict) and all(isinstance(key, str) for key, _ in part.items):
            for key, item in part.items:
                if not first:
                    out.write(", ")
                first = False
                out.write(f"{key}=")
                _write(out, item, depth)
        else:
            if not first:
                out.write(", ")
            first = False
            _write(out, part, depth)
    return first


def _int(value: int) -> str:
    if value.bit_length() > _MAX_INT_DIGITS * 3:  # repr would be slow, or refused
        return f"<int of {value.bit_length()} bits>"
    return repr(value)


def _render(value: object, limit: int) -> str:
    out = _Writer(limit)
    with contextlib.suppress(_Full):
        _write(out, value, 0)
    return out.text()


def _size(data: bytes | str) -> str:
    return f"{len(data)} byte" + ("" if len(data) == 1 else "s")


def _read_pickle(data: bytes, max_ops: int) -> object:
    try:
        return _read(data, max_ops)
    except (_Unreadable, ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        raise _Unreadable(str(exc)) from exc


def preview_pickle(data: bytes, limit: int = DEFAULT_LIMIT) -> str:
    """Return a repr-like text of a pickle, without importing or calling anything.

    Args:
        data: The pickle.
        limit: Maximum length of the text (0: no limit).

    Returns:
        The text; instances, classes and functions appear by name, such as
        ``<Point(x=1, y=2)>``, and a damaged pickle as a short description.
    """
    return _render(_pickled(data, _max_ops(limit)), limit)


def preview_value(value: any_pb2.Any, limit: int = DEFAULT_LIMIT) -> str:
    """Return a repr-like text of an encoded value (a call's output, for example).

    Args:
        value: The value, as a ``google.protobuf.Any``.
        limit: Maximum length of the text (0: no limit).
    """
    return _render(_decode(value, 0, _max_ops(limit)), limit)


def preview_input(value: any_pb2.Any, limit: int = DEFAULT_LIMIT) -> str:
    """Return a call's input as an argument list, such as ``(1, 'a', size=2)``.

    Args:
        value: The input, as a ``google.protobuf.Any``.
        limit: Maximum length of the text (0: no limit).
    """
    decoded = _decode(value, 0, _max_ops(limit))
    if (
        isinstance(decoded, tuple)
        and len(decoded) == 2
        and isinstance(decoded[0], tuple)
        and isinstance(decoded[1], _Dict)
        and all(isinstance(key, str) for key, _ in decoded[1].items)
    ):
        call = _Object(_Global(""), decoded[0], decoded[1])
    else:
        call = _Object(_Global(""), (decoded,))
    text = _render(call, limit + 4 if limit else 0)
    # The stand-in of a nameless call renders as "<(...)>": keep the argument list only.
    inner = text[1:-1] if text.endswith(")>") else text[1:]
    return inner if not limit or len(inner) <= limit else inner[: max(limit - 3, 1)] + "..."


def preview_error_value(data: bytes, limit: int = DEFAULT_LIMIT) -> str:
    """Return a repr-like text of a pickled exception (``Error.value``), or "" if none."""
    return preview_pickle(data, limit) if data else ""


# -- protobuf values ---------------------------------------------------------------------


def _max_ops(limit: int) -> int:
    return max(limit * _OPS_PER_CHAR, _MIN_OPS) if limit else 1 << 62


def _decode(value: any_pb2.Any, depth: int, max_ops: int) -> object:
    url = value.type_url
    if not url:
        return _Opaque("no value")
    name = url.rpartition("/")[2]
    try:
        if name == _PICKLED:
            data = pickled_pb2.Pickled.FromString(value.value).pickled_value
            return _pickled(data, max_ops)
        if name in _SCALARS:
            scalar: object = getattr(_SCALARS[name].FromString(value.value), "value")  # noqa: B009
            if isinstance(scalar, bytes) and scalar[:1] == b"\x80" and scalar[-1:] == b".":
                return _pickled(scalar, max_ops)  # dispatch-py's legacy form of pickles
            return scalar
        if name == "google.protobuf.Empty":
            empty_pb2.Empty.FromString(value.value)
            return None
        if name == "google.protobuf.Any" and depth < _MAX_DEPTH:
            return _decode(any_pb2.Any.FromString(value.value), depth + 1, max_ops)
        if name == "google.protobuf.Timestamp":
            stamp = timestamp_pb2.Timestamp.FromString(value.value)
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
                seconds=stamp.seconds, microseconds=stamp.nanos // 1000
            )
            return _Object(_Global("datetime.datetime"), (moment.isoformat(),))
        if name == "google.protobuf.Duration":
            duration = duration_pb2.Duration.FromString(value.value)
            seconds = duration.seconds + duration.nanos / 1e9
            return _Object(_Global("datetime.timedelta"), (seconds,))
        if name == "google.protobuf.Value":
            return _json(struct_pb2.Value.FromString(value.value))
        if name == "google.protobuf.Struct":
            return _struct(struct_pb2.Struct.FromString(value.value))
        if name == "google.protobuf.ListValue":
            return [_json(item) for item in struct_pb2.ListValue.FromString(value.value).values]
    except (DecodeError, OverflowError, ValueError):
        return _Opaque(f"corrupt {name}, {_size(value.value)}")
    return _Opaque(f"{name}, {_size(value.value)}")


def _pickled(data: bytes, max_ops: int) -> object:
    try:
        return _read_pickle(data, max_ops)
    except _TooBig as exc:
        if exc.partial is None:
            return _Opaque(f"pickle too large to preview, {_size(data)}")
        return _Partial(exc.partial)
    except _Unreadable:
        return _Opaque(f"pickle that cannot be read, {_size(data)}")


def _json(value: struct_pb2.Value) -> object:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return [_json(item) for item in value.list_value.values]
    return None


def _struct(value: struct_pb2.Struct) -> _Dict:
    built = _Dict()
    built.items.extend((key, _json(item)) for key, item in value.fields.items())
    return built
