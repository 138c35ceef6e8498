"""Human-readable forms of calls for the command line: values, inputs, errors, durations.

Values are decoded with `dispatch_aio._codec`, except pickles, which are loaded with an
unpickler that never imports a module: a pickle that names a class of a module the
command has not imported (the application's own classes, typically) is shown by the
name of that class instead. Importing the application's modules here could run its
start-up code in the command's process. It is not a sandbox: the values come from the
user's own scheduler, which the command reaches with its API key.
"""

from __future__ import annotations

__all__ = [
    "describe_error",
    "describe_input",
    "describe_result",
    "describe_value",
    "format_duration",
    "plural",
    "shorten",
]

import io
import pickle
import pickletools
import sys
from typing import Any

from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import DecodeError as ProtoDecodeError

from .. import _codec
from .._status import Status
from ..proto.sdk.python.v1 import pickled_pb2
from ..proto.sdk.v1 import call_pb2, error_pb2

_PICKLED = "dispatch.sdk.python.v1.Pickled"
_BYTES = "google.protobuf.BytesValue"
_ANY = "google.protobuf.Any"
_MAX_DEPTH = 8


def shorten(text: str, limit: int) -> str:
    """Return `text` on one line, cut to `limit` characters with an ellipsis."""
    text = " ".join(text.split()) if "\n" in text else text
    if limit > 0 and len(text) > limit:
        return text[: max(limit - 3, 1)] + "..."
    return text


def plural(count: int, word: str) -> str:
    """Return ``"1 attempt"`` or ``"3 attempts"``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def format_duration(seconds: float) -> str:
    """Return a short duration: ``850ms``, ``3.21s``, ``2m05s``, ``1h02m``."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    if seconds < 3600:
        minutes, rest = divmod(int(seconds), 60)
        return f"{minutes}m{rest:02d}s"
    hours, rest = divmod(int(seconds), 3600)
    if hours < 48:
        return f"{hours}h{rest // 60:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


class _NotHere(Exception):
    """The pickle names something that is not loaded in this process."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _LoadedOnly(pickle.Unpickler):
    """Unpickler that resolves names only from modules already imported."""

    def find_class(self, module_name: str, global_name: str, /) -> Any:
        module = sys.modules.get(module_name)
        if module is None or module_name == "__main__":
            raise _NotHere(f"{module_name}.{global_name}")
        target: Any = module
        try:
            for part in global_name.split("."):
                target = getattr(target, part)
        except AttributeError:
            raise _NotHere(f"{module_name}.{global_name}") from None
        return target


def _first_global(data: bytes) -> str | None:
    """Return the first class or function a pickle names (``module.name``), if any."""
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                return arg.replace(" ", ".")
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
    except Exception:  # a damaged pickle: no name to show
        return None
    return None


def _unpickle(data: bytes) -> tuple[bool, object]:
    """Return (True, value), or (False, description) when it cannot be loaded here."""
    try:
        return True, _LoadedOnly(io.BytesIO(data)).load()
    except _NotHere as exc:
        return False, f"<pickled {_first_global(data) or exc.name}, {plural(len(data), 'byte')}>"
    except Exception:
        name = _first_global(data)
        what = f"pickled {name}" if name else "pickle"
        return False, f"<{what} that does not load here, {plural(len(data), 'byte')}>"


def _decode(value: any_pb2.Any, depth: int = 0) -> tuple[bool, object]:
    """Return (True, python value) or (False, a description of the value)."""
    name = value.type_url.rpartition("/")[2]
    if not value.type_url:
        return False, "<no value>"
    try:
        if name == _PICKLED:
            return _unpickle(pickled_pb2.Pickled.FromString(value.value).pickled_value)
        if name == _ANY and depth < _MAX_DEPTH:
            return _decode(any_pb2.Any.FromString(value.value), depth + 1)
        if name == _BYTES:
            raw = wrappers_pb2.BytesValue.FromString(value.value).value
            if raw[:1] == b"\x80" and raw[-1:] == b".":
                loaded, result = _unpickle(raw)
                if loaded:
                    return True, result
            return True, raw
    except ProtoDecodeError:
        return False, f"<corrupt {name}, {plural(len(value.value), 'byte')}>"
    try:
        return True, _codec.decode_value(value)
    except _codec.DecodeError:
        return False, f"<{name or value.type_url}, {plural(len(value.value), 'byte')}>"


def describe_value(value: any_pb2.Any, limit: int = 200) -> str:
    """Return the ``repr`` of an encoded value, or a description when it cannot be decoded.

    Args:
        value: The encoded value.
        limit: Maximum length of the result (0: no limit).
    """
    decoded, result = _decode(value)
    text = _safe_repr(result) if decoded else str(result)
    return shorten(text, limit)


def describe_input(value: any_pb2.Any, limit: int = 200) -> str:
    """Return a call's input as an argument list: ``(1, 'a', size=2)``.

    Args:
        value: The encoded input.
        limit: Maximum length of the result (0: no limit).
    """
    decoded, result = _decode(value)
    if not decoded:
        return shorten(f"({result})", limit)
    args: tuple[object, ...] = (result,)
    kwargs: dict[str, object] = {}
    if type(result) is tuple and len(result) == 2:
        first, second = result
        if type(first) is tuple and type(second) is dict and all(type(k) is str for k in second):
            args, kwargs = first, second
    parts = [_safe_repr(arg) for arg in args]
    parts += [f"{key}={_safe_repr(val)}" for key, val in kwargs.items()]
    return shorten(f"({', '.join(parts)})", limit)


def describe_error(error: error_pb2.Error, limit: int = 300) -> str:
    """Return ``Type: message`` (or whichever of the two is set)."""
    kind = error.type.removeprefix("STATUS_") if error.type.startswith("STATUS_") else error.type
    if kind and error.message:
        text = f"{kind}: {error.message}"
    else:
        text = kind or error.message or "error without a type or message"
    return shorten(text, limit)


def describe_result(result: call_pb2.CallResult, status: int, limit: int = 200) -> str:
    """Return what a finished call produced: its output, or its error."""
    if result.HasField("error"):
        return describe_error(result.error, limit)
    if status not in (Status.OK, Status.UNSPECIFIED):
        return _status_name(status)
    if result.HasField("output"):
        return describe_value(result.output, limit)
    return "None"


def _status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"status {status}"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<{type(value).__qualname__} object: repr() failed ({exc})>"
