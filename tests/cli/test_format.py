"""How the command shows values, durations and names, and when it uses colours."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from e2e.harness import PYTHON
from google.protobuf import any_pb2, struct_pb2

from dispatch_aio._codec import encode_error, encode_input, encode_value
from dispatch_aio._status import Status
from dispatch_aio.cli._console import Console, Style
from dispatch_aio.cli._format import (
    describe_error,
    describe_input,
    describe_result,
    describe_value,
    format_duration,
)
from dispatch_aio.cli._run import program_name
from dispatch_aio.proto.sdk.python.v1 import pickled_pb2
from dispatch_aio.proto.sdk.v1 import call_pb2


def test_values_are_shown_as_their_repr() -> None:
    assert describe_value(encode_value([1, "a", None])) == "[1, 'a', None]"
    assert describe_value(encode_value("text")) == "'text'"
    assert describe_value(encode_value(timedelta(seconds=3))) == "datetime.timedelta(seconds=3)"
    assert describe_value(encode_value(None)) == "None"
    assert describe_value(encode_value("x" * 500), 20) == "'xxxxxxxxxxxxxxxx..."
    assert describe_value(encode_value("x" * 500), 0) == repr("x" * 500)


def test_inputs_are_shown_as_argument_lists() -> None:
    assert describe_input(encode_input((10,), {})) == "(10)"
    assert describe_input(encode_input((1, "b"), {"size": 2})) == "(1, 'b', size=2)"
    assert describe_input(encode_input((), {})) == "()"
    assert describe_input(encode_input(([1, 2],), {})) == "([1, 2])"


def test_values_that_cannot_be_decoded_are_described() -> None:
    unknown = any_pb2.Any(type_url="type.example.com/acme.Order", value=b"\x08\x01")
    assert describe_value(unknown) == "<acme.Order, 2 bytes>"
    corrupt = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Int64Value", value=b"\xff")
    assert describe_value(corrupt).startswith("<")
    damaged = any_pb2.Any()
    damaged.Pack(pickled_pb2.Pickled(pickled_value=b"\x80\x05not a pickle"))
    assert describe_value(damaged).startswith("<pickle that does not load here")
    # Other SDKs' JSON values decode.
    assert describe_value(_packed(struct_pb2.Value(number_value=2.5))) == "2.5"


def _packed(message: struct_pb2.Value) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


def test_pickles_of_modules_not_imported_are_named_without_importing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importing the application's modules could run its start-up code in the command.
    module = tmp_path / "startup_effect.py"
    module.write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('imported').touch()\n"
        "class Order:\n"
        "    pass\n"
    )
    make = (
        "import pickle, sys, startup_effect; "
        "sys.stdout.buffer.write(pickle.dumps(startup_effect.Order()))"
    )
    data = subprocess.run(
        [PYTHON, "-c", make], cwd=tmp_path, capture_output=True, check=True
    ).stdout
    (tmp_path / "imported").unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    value = any_pb2.Any()
    value.Pack(pickled_pb2.Pickled(pickled_value=data))
    assert describe_value(value) == f"<pickled startup_effect.Order, {len(data)} bytes>"
    assert not (tmp_path / "imported").exists()
    assert "startup_effect" not in sys.modules


def test_results_and_errors() -> None:
    ok = call_pb2.CallResult(output=encode_value(42))
    assert describe_result(ok, Status.OK) == "42"
    failed = call_pb2.CallResult(error=encode_error(ValueError("bad input")))
    assert describe_result(failed, Status.INVALID_ARGUMENT) == "ValueError: bad input"
    assert describe_result(call_pb2.CallResult(), Status.TIMEOUT) == "TIMEOUT"
    assert describe_error(encode_error(RuntimeError())) == "RuntimeError"
    assert describe_result(call_pb2.CallResult(), Status.OK) == "None"


def test_durations() -> None:
    assert format_duration(0.0123) == "12ms"
    assert format_duration(3.214) == "3.21s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3720) == "1h02m"
    assert format_duration(3 * 86400 + 7200) == "3d02h"
    assert format_duration(-1) == "0ms"


def test_program_names() -> None:
    assert program_name(["python", "app.py"]) == "app"
    assert program_name(["/usr/bin/python3.11", "-u", "src/server.py", "--port", "1"]) == "server"
    assert program_name(["python", "-m", "myapp.main"]) == "myapp.main"
    assert program_name(["python", "-X", "dev", "app.py"]) == "app"
    assert program_name(["python", "-c", "print(1)"]) == "python"
    assert program_name(["./run-service"]) == "run-service"
    assert program_name(["gunicorn-with-a-very-long-name"]) == "gunicorn-with-a-"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_and_status_line_only_on_a_terminal() -> None:
    pipe = Console(io.StringIO(), io.StringIO(), env={})
    assert not pipe.color and not pipe.live
    assert pipe.paint("x", Style.RED) == "x"

    out = _Terminal()
    term = Console(out, io.StringIO(), env={"TERM": "xterm"})
    assert term.color and term.live
    assert term.paint("x", Style.RED) == "\x1b[31mx\x1b[0m"
    term.status("3 pending")
    term.line("a line")
    term.status("2 pending")
    term.close()
    # The status line is erased before each line and drawn again after it.
    assert out.getvalue() == ("3 pending\r\x1b[Ka line\n3 pending\r\x1b[K2 pending\r\x1b[K")

    assert not Console(_Terminal(), io.StringIO(), env={"NO_COLOR": "1"}).color
    assert Console(_Terminal(), io.StringIO(), env={"NO_COLOR": ""}).color
    dumb = Console(_Terminal(), io.StringIO(), env={"TERM": "dumb"})
    assert not dumb.color and not dumb.live


def test_a_closed_output_does_not_stop_the_command() -> None:
    out = io.StringIO()
    console = Console(out, io.StringIO(), env={})
    out.close()
    console.line("nobody reads this")  # no exception
