"""Values keep their meaning in another process: classes by reference, canonical digests.

Each test encodes in one interpreter and decodes in a new one, as a restarted, redeployed or
replicated app does when it resumes a call. Same-process round trips cannot show this:
cloudpickle's class tracker hands back the original class there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dispatch_aio import errors
from dispatch_aio._codec import (
    decode_error,
    decode_value,
    encode_error,
    encode_input,
    encode_value,
    input_digest,
)
from dispatch_aio.proto.sdk.v1 import error_pb2

# The program: run with "encode" it writes values of its own classes; with "decode" it
# reads them and checks that they are instances of its classes, as a resumed call would.
PROGRAM = textwrap.dedent(
    """
    import dataclasses, enum, sys, typing
    from pathlib import Path

    from dispatch_aio import _codec
    from dispatch_aio.proto.sdk.v1 import error_pb2
    from google.protobuf import any_pb2


    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int
        y: int


    class Color(enum.Enum):
        RED = 1


    class Pair(typing.NamedTuple):
        left: int
        right: int


    class Boom(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(f"boom {code}")
            self.code = code


    class Outer:
        class Inner:
            pass


    def double(x: int) -> int:
        return 2 * x


    def local_class() -> type:
        class Local:
            value = 42
        return Local


    def main(mode: str, folder: Path) -> None:
        if mode == "encode":
            value = {"point": Point(1, 2), "color": Color.RED, "pair": Pair(3, 4),
                     "inner": Outer.Inner, "fn": double, "local": local_class()}
            (folder / "value").write_bytes(_codec.encode_value(value).SerializeToString())
            try:
                try:
                    raise KeyError("first")
                except KeyError as exc:
                    raise Boom(7) from exc
            except Boom as exc:
                (folder / "error").write_bytes(_codec.encode_error(exc).SerializeToString())
            return
        value = _codec.decode_value(any_pb2.Any.FromString((folder / "value").read_bytes()))
        assert type(value["point"]) is Point and value["point"] == Point(1, 2)
        assert value["color"] is Color.RED
        assert type(value["pair"]) is Pair and value["pair"] == (3, 4)
        assert value["inner"] is Outer.Inner
        assert value["fn"] is double
        assert value["local"].value == 42  # no importable name: a copy, by value
        error = _codec.decode_error(error_pb2.Error.FromString((folder / "error").read_bytes()))
        assert type(error) is Boom and error.code == 7, repr(error)
        assert type(error.__cause__) is KeyError and error.__cause__.args == ("first",)
        print("decoded", sys.modules["__main__"].__name__)


    if __name__ == "__main__":
        main(sys.argv[1], Path(sys.argv[2]))
    """
)


def _python(*args: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(PROGRAM)
    _python(path, "encode", tmp_path)
    return path


def test_classes_of_the_main_script_are_its_own_in_a_new_process(program: Path) -> None:
    assert _python(program, "decode", program.parent).strip() == "decoded __main__"


def test_a_main_script_loaded_as_a_module_resolves_main_names(program: Path) -> None:
    # As dispatch-aio check and the fresh-process test workers load a script.
    loader = (
        "import runpy, sys; "
        f"module = runpy.run_path({str(program)!r}, run_name='__mp_main__'); "
        "mp_main = type(sys)('__mp_main__'); mp_main.__dict__.update(module); "
        "sys.modules['__mp_main__'] = mp_main; "
        f"mp_main.main('decode', __import__('pathlib').Path({str(program.parent)!r}))"
    )
    assert _python("-c", loader).strip() == "decoded __main__"


def test_another_program_is_told_which_main_name_is_missing(program: Path) -> None:
    reader = (
        "from google.protobuf import any_pb2; from dispatch_aio import _codec; "
        f"data = open({str(program.parent / 'value')!r}, 'rb').read(); "
        "_codec.decode_value(any_pb2.Any.FromString(data))"
    )
    done = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    assert "main script of the program that wrote it" in done.stderr
    assert "define" in done.stderr


def test_exception_chain_and_notes_round_trip() -> None:
    try:
        try:
            {}["missing"]
        except KeyError:
            try:
                raise ValueError("inner") from OSError(2, "gone")
            except ValueError as exc:
                exc.add_note("a note")
                raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        error = decode_error(encode_error(exc))
    assert type(error) is RuntimeError
    cause = error.__cause__
    assert type(cause) is ValueError and cause.args == ("inner",)
    assert cause.__notes__ == ["a note"]
    # OSError(2, ...) is a FileNotFoundError, here as in Python itself.
    assert type(cause.__cause__) is FileNotFoundError and cause.__cause__.strerror == "gone"
    assert type(cause.__context__) is KeyError
    assert error.__suppress_context__


def test_an_unpicklable_chain_does_not_lose_the_exception() -> None:
    try:
        try:
            raise LookupError(x for x in ())  # a generator never pickles
        except LookupError as inner:
            raise ValueError("kept") from inner
    except ValueError as exc:
        error = decode_error(encode_error(exc))
    assert type(error) is ValueError and error.args == ("kept",)
    assert error.__cause__ is None


SET_DIGEST = textwrap.dedent(
    """
    import pickle, sys
    from dispatch_aio import _codec
    from dispatch_aio.proto.sdk.python.v1 import pickled_pb2
    value = ({"alpha", "beta", "gamma", "delta", "epsilon"},
             {"k": frozenset({b"x", b"y", b"z"}), "n": [{"p", "q"}]})
    encoded = _codec.encode_input(value, {"tags": {"u", "v", "w"}})
    raw = pickled_pb2.Pickled.FromString(encoded.value).pickled_value
    print(_codec.input_digest(encoded).hex(), raw.hex())
    """
)


def test_input_digest_of_sets_is_the_same_whatever_the_hash_seed() -> None:
    runs = [
        _python("-c", SET_DIGEST, env={"PYTHONHASHSEED": str(seed)}).split() for seed in range(1, 7)
    ]
    assert len({raw for _, raw in runs}) > 1  # the pickles do differ: the test can fail
    assert len({digest for digest, _ in runs}) == 1


def test_input_digest_still_tells_values_apart() -> None:
    def digest(*args: object) -> bytes:
        return input_digest(encode_input(args, {}))

    assert digest({"a", "b"}, 1) == digest({"b", "a"}, 1)
    assert digest({"a", "b"}, 1) != digest({"a", "c"}, 1)
    assert digest({"a", "b"}, 1) != digest(frozenset({"a", "b"}), 1)
    assert digest({"a": {1}}, 2) != digest({"a": {2}}, 2)
    assert digest([1, 2], 3) != digest((1, 2), 3)
    cyclic: list[object] = [{"x"}]
    cyclic.append(cyclic)
    assert digest(cyclic, 4) == digest(cyclic, 4)
    # Values without sets keep the plain digest of their bytes.
    assert input_digest(encode_value([1, 2])) == input_digest(encode_value([1, 2]))
    assert decode_value(encode_value({"a", "b"})) == {"a", "b"}


def test_a_status_error_from_the_scheduler_is_the_class_of_its_status() -> None:
    expired = decode_error(error_pb2.Error(type="STATUS_TIMEOUT", message="call expired"))
    assert type(expired) is errors.DispatchTimeoutError and isinstance(expired, TimeoutError)
    assert "call expired" in str(expired)
    throttled = decode_error(error_pb2.Error(type="STATUS_THROTTLED", message="slow down"))
    assert type(throttled) is errors.ThrottledError
    # Another SDK's own error type stays a RemoteError.
    other = decode_error(error_pb2.Error(type="ValueError", message="bad"))
    assert type(other) is errors.RemoteError and other.type_name == "ValueError"
