"""Nondeterminism detection: the program reading the clock or randomness directly.

A durable function replays from its journal, so whatever it decides must come out
the same every time. Reading the wall clock, the global ``random``, ``uuid.uuid4``,
``os.urandom`` or ``secrets`` does not: the replacements (`dispatch_aio.now`,
``loop.time()``, `dispatch_aio.random`, `dispatch_aio.uuid4`, or a durable call
whose result is journaled) do.

`Watch` finds such reads without a sandbox: while the durable loop steps, a
profile hook (``sys.setprofile``, per thread, so only the stepping thread) sees
each call of those functions, and reports the ones made directly by the program's
own code (the same rule as for durable timers, see ``_loop``): the standard library
and third-party packages read the clock for their own purposes (logging, I/O
timeouts), and code run on the host loop or in threads is not watched.

It can also perturb the time the process reads while the loop steps
(``time.time``, ``time.monotonic`` and their ``_ns`` forms, looked up through the
module), by an offset that grows with the round (a day, an hour, a minute and a
second per round), so that a branch on the real time flips between a round and its
replay, even in library code the hook does not blame.
"""

from __future__ import annotations

__all__ = ["PERTURB_STEP", "Read", "Sources", "Watch"]

import datetime
import os
import random
import secrets
import sys
import time
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Between two runs the perturbed time moves by one day, one hour, one minute and one
# second: a branch on the date, the hour, the minute or the parity of the second flips.
PERTURB_STEP = 86400.0 + 3600.0 + 60.0 + 1.0

_NOW = "dispatch_aio.now() (durable time, the same on replay)"
_LOOP_TIME = "asyncio.get_running_loop().time() (durable time on the monotonic scale)"
_RANDOM = "dispatch_aio.random(), or a random.Random seeded with it"
_UUID = "dispatch_aio.uuid4()"
_SECRET = (
    "a durable call to a function of your own that makes it (its result is journaled); "
    "secrets must not be derived from a replayable seed"
)


@dataclass(frozen=True, slots=True)
class Read:
    """One direct read of a nondeterministic source by the program."""

    source: str
    """What was called, e.g. ``time.time()``."""
    replacement: str
    """What to use instead."""
    site: str
    """Where the program called it, ``file:line``."""

    def describe(self) -> str:
        """One line: what, where, and what to use instead."""
        return f"{self.source} at {self.site}: use {self.replacement}"


def _c_sources() -> dict[Any, tuple[str, str]]:
    """C functions (``c_call`` events), by the function object called."""
    found: dict[Any, tuple[str, str]] = {}
    for name in ("time", "time_ns"):
        found[getattr(time, name)] = (f"time.{name}()", _NOW)
    for name in ("monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns"):
        found[getattr(time, name)] = (f"time.{name}()", _LOOP_TIME)
    for cls in (datetime.datetime, datetime.date):
        for name in ("now", "utcnow", "today"):
            method = getattr(cls, name, None)
            if method is not None:
                found[method] = (f"{cls.__name__}.{name}()", _NOW)
    # The global random's methods implemented in C, bound to its hidden instance.
    shared = random._inst
    for name in ("random", "getrandbits"):
        found[getattr(shared, name)] = (f"random.{name}()", _RANDOM)
    found[os.urandom] = ("os.urandom()", _SECRET)
    if hasattr(os, "getrandom"):
        found[os.getrandom] = ("os.getrandom()", _SECRET)
    return found


def _py_sources() -> dict[types.CodeType, tuple[str, str, bool]]:
    """Python functions (``call`` events), by code: source, replacement, is a method."""
    found: dict[types.CodeType, tuple[str, str, bool]] = {}
    for name in ("uuid1", "uuid4"):
        found[getattr(uuid, name).__code__] = (f"uuid.{name}()", _UUID, False)
    for name in ("token_bytes", "token_hex", "token_urlsafe", "randbelow"):
        found[getattr(secrets, name).__code__] = (f"secrets.{name}()", _SECRET, False)
    for cls in (random.Random, random.SystemRandom):
        for name, value in vars(cls).items():
            code = getattr(value, "__code__", None)
            if isinstance(code, types.CodeType) and not name.startswith("__"):
                found.setdefault(code, (f"random.{name}()", _RANDOM, True))
    return found


def _shifted(real: Callable[[], Any], shift: float) -> types.FunctionType:
    def shifted() -> Any:
        return real() + shift

    return shifted  # type: ignore[return-value]


class Sources:
    """The functions watched, looked up once (per runner) and shared by its runs."""

    def __init__(self) -> None:
        self.c = _c_sources()
        self.py = _py_sources()


class Watch:
    """Watches one run's steps; see the module docstring.

    Args:
        is_program: Whether a frame is the program's own code.
        offset: Seconds added to the time read through the ``time`` module while
            the loop steps (0: no perturbation).
        detect: Whether to watch for reads at all (only time is perturbed without).
        sources: The functions watched.
    """

    def __init__(
        self,
        is_program: Callable[[types.FrameType], bool],
        offset: float,
        *,
        detect: bool,
        sources: Sources,
    ) -> None:
        self._is_program = is_program
        self._offset = offset
        self.detect = detect
        """Watch for reads in the next steps. A replay re-executes code that ran live
        once already, where it was watched: turning this off there saves the cost."""
        self._c = sources.c
        self._py = sources.py
        self._shared = random._inst
        self.reads: list[Read] = []
        self._seen: set[tuple[str, str]] = set()
        self._saved: Any = None
        self._originals: dict[str, Callable[[], Any]] = {}
        self._wrappers: set[types.CodeType] = set()

    def __enter__(self) -> None:
        if self._offset:
            self._perturb()
        if self.detect:
            self._saved = sys.getprofile()
            sys.setprofile(self._hook)

    def __exit__(self, *exc_info: object) -> None:
        if self.detect:
            sys.setprofile(self._saved)
            self._saved = None
        for name, original in self._originals.items():
            setattr(time, name, original)
        self._originals.clear()

    def _perturb(self) -> None:
        # Only for the step: the host loop and the SDK read the real time outside it.
        for name in ("time", "monotonic", "time_ns", "monotonic_ns"):
            real = getattr(time, name)
            self._originals[name] = real
            shift = int(self._offset * 1e9) if name.endswith("_ns") else self._offset
            wrapper = _shifted(real, shift)
            self._wrappers.add(wrapper.__code__)
            setattr(time, name, wrapper)

    def _hook(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "c_call":
            try:
                found = self._c.get(arg)
            except TypeError:  # an unhashable callable
                return
            if found is None:
                return
            caller: types.FrameType | None = frame
            source, replacement = found
        elif event == "call":
            entry = self._py.get(frame.f_code)
            if entry is None:
                return
            source, replacement, method = entry
            if method:
                owner = frame.f_locals.get("self")
                # A Random of the program's own (seeded) is deterministic.
                if owner is not self._shared and not isinstance(owner, random.SystemRandom):
                    return
                if isinstance(owner, random.SystemRandom):
                    replacement = _SECRET
            caller = frame.f_back
        else:
            return
        if caller is not None and caller.f_code in self._wrappers:
            caller = caller.f_back  # the perturbed time.time(): blame who called it
        if caller is None or not self._is_program(caller):
            return
        site = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        if (source, site) not in self._seen:
            self._seen.add((source, site))
            self.reads.append(Read(source, replacement, site))
