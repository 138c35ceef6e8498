"""Log records of durable functions: their call id, function and attempt; default output.

The scheduler numbers each attempt of a call and hands the number to the endpoint
(the ``Dispatch-Aio-Attempt`` header over HTTP, `ATTEMPT` in process); the run keeps
it, and `RunFilter` puts it on every record logged inside the run, with the call id
and the function name. When the application has not configured logging, `dispatch.run()`
and apps started by ``dispatch-aio run`` install `default_handler` on the root logger,
so that the lines of ``dispatch_aio.get_logger`` show.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT",
    "ATTEMPT_HEADER",
    "LOG_FORMAT",
    "LOG_FORMATS",
    "JsonFormatter",
    "RunFilter",
    "TextFormatter",
    "configure_default_logging",
    "log_format_from_env",
]

import datetime
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from .durable import ATTEMPT, current_run

ATTEMPT_HEADER = "Dispatch-Aio-Attempt"
LOG_FORMAT = "DISPATCH_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
_FIELDS = ("dispatch_id", "function", "attempt")


class RunFilter(logging.Filter):
    """Adds ``dispatch_id``, ``function`` and ``attempt`` to records logged inside a run.

    Outside a run they are empty strings and 0, so that formats may name them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops one."""
        run = current_run()
        if run is not None:
            record.dispatch_id = run.dispatch_id
            record.function = run.function
            record.attempt = run.attempt
        else:
            for field in _FIELDS:
                if not hasattr(record, field):
                    setattr(record, field, 0 if field == "attempt" else "")
        return True


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, with ``[function id attempt N]`` inside a run."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record (and its traceback, if any)."""
        text = super().format(record)
        function = getattr(record, "function", "")
        where = ""
        if function:
            attempt = getattr(record, "attempt", 0)
            where = f" [{function} {getattr(record, 'dispatch_id', '')}" + (
                f" attempt {attempt}]" if attempt else "]"
            )
        return f"{record.levelname} {record.name}{where}: {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a JSON object."""
        fields: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value:
                fields[field] = value
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


def log_format_from_env(env: Mapping[str, str]) -> str | None:
    """Return the log format the environment asks for, or None if it names none.

    Raises:
        ValueError: The variable names an unknown format.
    """
    value = env.get(LOG_FORMAT, "").strip().lower()
    if not value:
        return None
    if value not in LOG_FORMATS:
        raise ValueError(f"invalid {LOG_FORMAT}={value!r}: use 'text' or 'json'")
    return value


def formatter(log_format: str) -> logging.Formatter:
    """Return the formatter of a format name ('text' or 'json')."""
    return JsonFormatter() if log_format == "json" else TextFormatter()


def _quiet_scheduler(record: logging.LogRecord) -> bool:
    """Keep the embedded scheduler's routine lines (migrations, ...) out of the app's output."""
    return record.levelno >= logging.WARNING or not record.name.startswith("dispatch_aio.scheduler")


def configure_default_logging(log_format: str) -> logging.Handler | None:
    """Send INFO and above to standard error, unless the application configured logging.

    The embedded scheduler's records show from WARNING up, as under ``dispatch-aio``.

    Returns:
        The handler installed on the root logger, or None if logging was configured.
    """
    root = logging.getLogger()
    if root.handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RunFilter())
    handler.addFilter(_quiet_scheduler)
    root.addHandler(handler)
    if root.level == logging.WARNING:  # the default: nothing below it was chosen
        root.setLevel(logging.INFO)
    return handler
