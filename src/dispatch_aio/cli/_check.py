"""``dispatch-aio check``: replay recorded journals against the current code.

Journals come from files (a serialized journal, or the Any that wraps it) or
from the calls a local scheduler keeps suspended in its database, where a
journal is stored whole or, with the journal extension, as segments to join. The
application is imported from ``module:attribute`` or ``path/to/app.py:attribute``
(its ``if __name__ == "__main__":`` block does not run).
"""

from __future__ import annotations

__all__ = ["JournalSource", "describe", "load_target", "read_journals", "run_check"]

import importlib
import importlib.util
import pathlib
import sqlite3
import sys
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from .._dispatch import Dispatch
from .._replay_worker import load_main
from ..durable import JOURNAL_TYPE_URL
from ..testing import JournalReport, check_journals
from ._scheduler import CliError

JournalSource = tuple[str, bytes]

# StateKind of the scheduler's store: TYPED, the state column holds a serialized Any;
# SEGMENTS, the journal is the concatenation of its rows in `segments`.
_TYPED_STATE = 2
_SEGMENTS_STATE = 3


def load_target(spec: str) -> Dispatch:
    """Import ``module:attribute`` (or ``file.py:attribute``) and return that Dispatch.

    A file is loaded as this process's ``__main__`` (see `load_main`), which the command
    then is; callers that go on afterwards restore ``sys.modules["__main__"]``.
    """
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "dispatch"
    if not module_name:
        raise CliError(f"invalid application {spec!r}: use module:attribute, e.g. app:dispatch", 2)
    try:
        if module_name.endswith(".py"):
            path = pathlib.Path(module_name).resolve()
            if not path.is_file():
                raise CliError(f"no such file: {module_name}", 2)
            sys.path.insert(0, str(path.parent))
            # The script runs as this process's __main__, as under `python app.py`: the
            # journals name its classes `__main__.X`, and the inputs replayed here must
            # pickle (and digest) as they did there.
            module = load_main("file", str(path))
        else:
            sys.path.insert(0, str(pathlib.Path.cwd()))
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except Exception as exc:  # the user's module failed to import
        hint = ""
        if isinstance(exc, RuntimeError) and "running event loop" in str(exc):
            hint = (
                f"; {module_name} starts the app when it is imported (dispatch.run() or "
                "asyncio.run() at the top level): put that under `if __name__ == "
                '"__main__":` so that check can import its functions without running it'
            )
        raise CliError(f"cannot import {module_name}: {type(exc).__name__}: {exc}{hint}") from exc
    target = getattr(module, attribute, None)
    if not isinstance(target, Dispatch):
        raise CliError(
            f"{module_name} has no Dispatch object named {attribute!r}; "
            f"name it as {module_name}:NAME"
        )
    return target


def _journal_bytes(data: bytes) -> bytes | None:
    """Return the journal in ``data``: itself, or unwrapped from its Any."""
    try:
        wrapped = any_pb2.Any.FromString(data)
    except DecodeError:
        return data
    if wrapped.type_url == JOURNAL_TYPE_URL:
        return wrapped.value
    return data if not wrapped.type_url else None


def read_journals(files: Iterable[str], database: pathlib.Path | None) -> list[JournalSource]:
    """Collect journals from files and from a scheduler database."""
    journals: list[JournalSource] = []
    for name in files:
        try:
            data = pathlib.Path(name).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {name}: {exc.strerror}") from exc
        journal = _journal_bytes(data)
        if journal is not None:
            journals.append((name, journal))
    if database is not None:
        journals.extend(_from_database(database))
    return journals


def _from_database(path: pathlib.Path) -> list[JournalSource]:
    if not path.is_file():
        raise CliError(f"no scheduler database at {path}; give --data-dir or journal files")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = conn.execute(
                "SELECT id, state_kind, state FROM calls WHERE state_kind IN (?, ?) ORDER BY seq",
                (_TYPED_STATE, _SEGMENTS_STATE),
            ).fetchall()
            journals = []
            for dispatch_id, kind, state in rows:
                if kind == _SEGMENTS_STATE:
                    segments = conn.execute(
                        "SELECT data FROM segments WHERE call_id = ? ORDER BY polls",
                        (dispatch_id,),
                    ).fetchall()
                    journals.append((str(dispatch_id), b"".join(bytes(s) for (s,) in segments)))
                elif (journal := _journal_bytes(bytes(state))) is not None:
                    journals.append((str(dispatch_id), journal))
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        raise CliError(
            f"cannot read {path} ({exc}); a running scheduler keeps it locked: stop it first"
        ) from exc
    return journals


async def run_check(target: Dispatch, journals: list[JournalSource]) -> list[JournalReport]:
    """Replay the journals against ``target``'s functions."""
    return await check_journals(target, journals)


def describe(reports: list[JournalReport]) -> Iterable[str]:
    """Lines that report the outcome, one per journal, then one per patch still needed.

    A journal whose replay takes the old branch of a `dispatch_aio.patched` change
    still needs that branch: the line per patch says how many do. When none does,
    ``deprecate_patch`` may replace the test (for the journals stored here).
    """
    needed: dict[str, int] = {}
    for report in reports:
        verdict = "ok      " if report.ok else "DIVERGES"
        version = f", version {report.app_version}" if report.app_version else ""
        line = f"{verdict} {report.name} ({report.function or '?'}{version})"
        if report.old_patches:
            line += f": takes the old branch of {', '.join(map(repr, report.old_patches))}"
        for patch in report.old_patches:
            needed[patch] = needed.get(patch, 0) + 1
        yield line if report.ok else f"{line}: {report.problem}"
    for patch, count in sorted(needed.items()):
        journals = "journal still takes" if count == 1 else "journals still take"
        yield (
            f"patch {patch!r}: {count} stored {journals} its old branch; keep "
            f"`if patched({patch!r}):` and the old branch until they end"
        )
    if reports and not needed:
        yield "no stored journal takes the old branch of a patch"
