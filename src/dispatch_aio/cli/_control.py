"""The commands that act on a running scheduler through the client: events and schedules."""

from __future__ import annotations

__all__ = ["add_control_commands", "send_event_command"]

import argparse
import json
from typing import Any

from .. import errors
from .._client import Client
from ..errors import PermanentError
from ._console import Console
from ._scheduler import CliError

PROG = "dispatch-aio"


def add_control_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    api: argparse.ArgumentParser,
) -> None:
    """Add ``send-event`` (and the ``schedule`` commands) to the command line."""
    send = commands.add_parser(
        "send-event",
        parents=[api],
        help="resolve a durable event: functions waiting on its key resume",
        description="Resolve the durable event KEY with VALUE (JSON): every function waiting "
        "in `await dispatch_aio.wait_event(KEY)` receives it, and functions that wait on KEY "
        "later get it at once. An event is resolved once.",
    )
    send.add_argument("key", metavar="KEY", help="the event's key")
    send.add_argument(
        "value",
        metavar="VALUE",
        nargs="?",
        help='the value, as JSON (e.g. true, 42, "text", {"approved": true}); default null',
    )
    send.add_argument(
        "--error",
        metavar="MESSAGE",
        help="resolve the event with an error instead: waiters get PermanentError(MESSAGE)",
    )


def _json_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(
            f"VALUE must be JSON ({exc}): quote strings for the shell, e.g. '\"yes\"', "
            "or give a number, true, false, null, a list or an object",
            code=2,
        ) from None


async def send_event_command(args: argparse.Namespace, console: Console, url: str, key: str) -> int:
    """Run ``dispatch-aio send-event KEY [VALUE] [--error MESSAGE]``."""
    if args.error is not None and args.value is not None:
        raise CliError("give VALUE or --error, not both", code=2)
    value = _json_value(args.value)
    error = PermanentError(args.error) if args.error is not None else None
    try:
        async with Client(api_url=url, api_key=key) as client:
            woken = await client.send_event(args.key, value, error=error)
    except errors.EventAlreadyResolvedError as exc:
        raise CliError(exc.message) from None
    except errors.DispatchError as exc:
        raise CliError(str(exc)) from None
    waiting = "1 call was waiting" if woken == 1 else f"{woken} calls were waiting"
    console.line(f"event {args.key!r} resolved; {waiting} and resumed")
    return 0
