"""Previews of call values: pickles are read opcode by opcode, never loaded."""

from __future__ import annotations

import dataclasses
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from dispatch_aio._codec import encode_error, encode_input, encode_value
from dispatch_aio.scheduler._preview import preview_input, preview_pickle, preview_value


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Trap:
    """Unpickling it would create a file: a preview must not."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1, "1"),
        ("<script>alert(1)</script>", "'<script>alert(1)</script>'"),
        (None, "None"),
        (b"\x00x", "b'\\x00x'"),
        ([1, (2,), {"a": {3}}], "[1, (2,), {'a': {3}}]"),
        (frozenset({1}), "frozenset({1})"),
        (Point(1, 2), "<Point(x=1, y=2)>"),
        (ValueError("boom"), "<ValueError('boom')>"),
        (OrderedDict(a=1), "<OrderedDict(a=1)>"),
        (2**70, str(2**70)),
        (2**20000, "<int of 20001 bits>"),
        (bytearray(b"ab"), "<bytearray(b'ab')>"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_values_render_like_their_repr(value: object, text: str) -> None:
    assert preview_value(encode_value(value)) == text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_reads(protocol: int) -> None:
    data = pickle.dumps({"a": [1, (2, 3), {4}, b"x", Point(1, 2), None, 1.5]}, protocol=protocol)
    assert preview_pickle(data) == "{'a': [1, (2, 3), {4}, b'x', <Point(x=1, y=2)>, None, 1.5]}"


def test_a_pickle_that_would_run_code_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "ran"
    data = pickle.dumps([Trap(str(target))])
    modules = set(sys.modules)
    # What a path pickles as differs across Python versions (its parts, or its string).
    parts = ", ".join(repr(part) for part in Path(str(target)).__reduce__()[1])
    assert preview_pickle(data) == f"[<touch(<PosixPath({parts})>)>]"
    assert preview_value(encode_value(Trap(str(target)))).startswith("<touch(")
    assert not target.exists()
    assert set(sys.modules) == modules
    pickle.loads(data)  # the control: loading it does run it
    assert target.exists()


def test_a_pickle_naming_an_unimported_module_imports_nothing() -> None:
    data = pickle.dumps(0)[:2] + b"\x8c\x0enot_a_real_mod\x8c\x01f\x93)R."
    assert preview_pickle(data) == "<f()>"
    assert "not_a_real_mod" not in sys.modules


def test_inputs_show_as_argument_lists() -> None:
    assert preview_input(encode_input((1, "a"), {"size": 2})) == "(1, 'a', size=2)"
    assert preview_input(encode_input((), {})) == "()"
    assert preview_input(encode_input(("x",), {})) == "('x')"
    assert preview_input(encode_input((Point(0, 1),), {})) == "(<Point(x=0, y=1)>)"


def test_previews_are_bounded() -> None:
    text = preview_value(encode_value(list(range(100_000))), limit=50)
    assert len(text) == 50
    assert text.endswith("...")
    shared: list[object] = [1]
    for _ in range(60):  # each level twice the one below: 2**60 leaves if expanded
        shared = [shared, shared]
    assert len(preview_value(encode_value(shared), limit=100)) <= 100
    loop: list[object] = []
    loop.append(loop)
    assert preview_pickle(pickle.dumps(loop)) == "[<...>]"


def test_damaged_and_unknown_values_are_described() -> None:
    assert preview_pickle(b"garbage") == "<pickle that cannot be read, 7 bytes>"
    cut = pickle.dumps([1, 2])[:-3]
    assert preview_pickle(cut) == f"<pickle that cannot be read, {len(cut)} bytes>"
    unknown = encode_value(1)
    unknown.type_url = "type.googleapis.com/acme.Thing"
    assert preview_value(unknown) == "<acme.Thing, 2 bytes>"


def test_errors_pickled_with_their_chain_show_their_type() -> None:
    try:
        try:
            raise KeyError("k")
        except KeyError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        error = encode_error(exc)
    assert preview_pickle(error.value).startswith("<RuntimeError('outer'")
