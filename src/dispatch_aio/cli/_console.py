"""Terminal output of the command: prefixed lines, colours, and a status line redrawn in place.

Colours are used only when the stream is a terminal, ``TERM`` is not ``dumb`` and
``NO_COLOR`` is unset or empty (https://no-color.org). The status line is drawn only
when standard output is a terminal; it is erased before every other line is written and
drawn again after it, so it stays the last line on screen.
"""

from __future__ import annotations

__all__ = ["Console", "ConsoleLogHandler", "Style"]

import enum
import logging
import os
import shutil
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, TextIO

from .._logs import JsonFormatter, RunFilter, TextFormatter


class Style(enum.Enum):
    """ANSI styles used by the command."""

    PLAIN = ""
    BOLD = "1"
    DIM = "2"
    RED = "31"
    GREEN = "32"
    YELLOW = "33"
    BLUE = "34"
    MAGENTA = "35"
    CYAN = "36"


_ERASE_LINE = "\r\x1b[K"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class Console:
    """Writes whole lines to standard output and error, keeping a status line at the bottom.

    Args:
        out: Standard output.
        err: Standard error.
        env: The environment (``NO_COLOR``, ``TERM``); default `os.environ`.
        color: Force colours on or off; default: decided from `out` and `env`.
        live: Force the status line on or off; default: only when `out` is a terminal.
    """

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        env: Mapping[str, str] | None = None,
        color: bool | None = None,
        live: bool | None = None,
    ) -> None:
        environ = os.environ if env is None else env
        dumb = environ.get("TERM", "") == "dumb"
        tty = _isatty(out)
        self._out = out
        self._err = err
        self.live = (tty and not dumb) if live is None else live
        self.color = (tty and not dumb and not environ.get("NO_COLOR")) if color is None else color
        self._err_color = self.color and _isatty(err)
        self._status = ""
        self._shown = False
        self._broken: set[int] = set()

    def paint(self, text: str, style: Style, *, err: bool = False) -> str:
        """Return `text` in `style` when colours are on for that stream."""
        on = self._err_color if err else self.color
        if not on or style is Style.PLAIN:
            return text
        return f"\x1b[{style.value}m{text}\x1b[0m"

    def line(self, text: str, *, err: bool = False) -> None:
        """Write one line (without its newline) to standard output, or error with `err`."""
        self._hide()
        self._write(self._err if err else self._out, text + "\n")
        self._show()

    def clear_screen(self) -> bool:
        """Clear the terminal (for a view redrawn in place); False when output is not one."""
        if not self.live:
            return False
        self._hide()
        self._write(self._out, "\x1b[H\x1b[2J")
        return True

    def status(self, text: str) -> None:
        """Replace the status line (drawn only when `live`); an empty text removes it."""
        if not self.live or text == self._status:
            return
        self._hide()
        self._status = text
        self._show()

    def close(self) -> None:
        """Erase the status line."""
        self._hide()
        self._status = ""

    def _hide(self) -> None:
        if self._shown:
            self._shown = False
            self._write(self._out, _ERASE_LINE)

    def _show(self) -> None:
        if self.live and self._status and not self._shown:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            text = self._status if len(self._status) <= width else self._status[: width - 3] + "..."
            self._write(self._out, text)
            self._shown = True

    def _write(self, stream: TextIO, text: str) -> None:
        if id(stream) in self._broken:
            return
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(stream, "encoding", None) or "ascii"
                stream.write(text.encode(encoding, "replace").decode(encoding))
            stream.flush()
        except (OSError, ValueError):
            # The reader went away (a closed pipe): keep running, stop writing there.
            self._broken.add(id(stream))


class ConsoleLogHandler(logging.Handler):
    """Writes log records to standard error through a `Console`, one line per text line.

    Args:
        console: Where to write.
        prefix: Text put before every line (such as ``"dispatch | "``).
    """

    _LEVEL_STYLES: ClassVar[Mapping[int, Style]] = MappingProxyType(
        {
            logging.DEBUG: Style.DIM,
            logging.INFO: Style.PLAIN,
            logging.WARNING: Style.YELLOW,
            logging.ERROR: Style.RED,
            logging.CRITICAL: Style.RED,
        }
    )

    def __init__(self, console: Console, prefix: str = "", *, json: bool = False) -> None:
        super().__init__()
        self._console = console
        self._prefix = prefix
        self._json = json
        self.addFilter(RunFilter())
        self.setFormatter(JsonFormatter() if json else TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record."""
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self._json:  # one object per line, unpainted: for programs to read
            self._console.line(text, err=True)
            return
        style = self._LEVEL_STYLES.get(record.levelno, Style.PLAIN)
        for part in text.splitlines() or [""]:
            self._console.line(self._prefix + self._console.paint(part, style, err=True), err=True)
