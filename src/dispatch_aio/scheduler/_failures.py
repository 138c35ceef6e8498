"""How the scheduler logs a failure it recovers from."""

from __future__ import annotations

__all__ = ["log_failure"]

import logging

from .store import StoreError


def log_failure(logger: logging.Logger, exc: BaseException, message: str, *args: object) -> None:
    """Log `message` (%-formatted with `args`) and the failure `exc`.

    A store's error already names the database and what to do: it goes on the same
    line, without a traceback. Anything else is unexpected and keeps its traceback.
    """
    if isinstance(exc, StoreError):
        logger.error("%s: %s", message % args if args else message, exc)
    else:
        logger.error(message, *args, exc_info=exc)
