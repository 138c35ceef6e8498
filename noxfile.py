"""Development sessions: tests, lint, typecheck and protobuf generation."""

from __future__ import annotations

import filecmp
import pathlib
import shutil
import tempfile

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

ROOT = pathlib.Path(__file__).parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "src" / "dispatch_aio" / "proto"
# Pinned so that regenerating gives byte-identical files; the protobuf runtime
# must be at least the version these tools record in the generated code.
PROTO_TOOLS = ["grpcio-tools==1.85.1", "mypy-protobuf==5.1.0"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check src/ with mypy in strict mode."""
    session.install("-e", ".[dev]")
    session.run("mypy")


def _generate(session: nox.Session, out: pathlib.Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out}",
        f"--mypy_out=quiet:{out}",
        *sources,
        external=False,
    )
    # protoc writes no packages; every generated folder needs an __init__.py.
    for folder in (out / "dispatch_aio" / "proto").rglob("*"):
        if folder.is_dir():
            (folder / "__init__.py").touch()
    (out / "dispatch_aio" / "proto" / "__init__.py").touch()


@nox.session
def protos(session: nox.Session) -> None:
    """Regenerate src/dispatch_aio/proto from protos/ (`-- --check` fails on drift)."""
    session.install(*PROTO_TOOLS)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        _generate(session, out)
        fresh = out / "dispatch_aio" / "proto"
        if "--check" in session.posargs:
            stale = _differences(fresh, GENERATED)
            if stale:
                session.error(f"generated protobuf code is stale: {stale}; run `nox -s protos`")
            return
        shutil.rmtree(GENERATED, ignore_errors=True)
        shutil.copytree(fresh, GENERATED)


def _differences(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    for name in cmp.subdirs:
        found.extend(f"{name}/{d}" for d in _differences(a / name, b / name))
    return found
