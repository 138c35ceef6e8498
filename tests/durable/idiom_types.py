"""Types the idiom sweep sends across calls, defined in a module of their own.

A value of one of these types must come back as an instance of the very class
here (``isinstance`` holds, ``except Boom`` catches) in every mode, a resume in a
new process included.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


@dataclasses.dataclass
class Route:
    name: str
    stops: list[Point] = dataclasses.field(default_factory=list)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Pair(NamedTuple):
    left: int
    right: str


class Boom(Exception):
    """An application error with attributes of its own."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"boom {self.code}: {self.detail}"


class BigBoom(Boom):
    """A subclass, to check that ``except Boom`` catches it as one."""
