"""The commands that act on a running scheduler through the client: events and schedules."""

from __future__ import annotations

__all__ = ["add_control_commands", "schedule_command", "send_event_command"]

import argparse
import json
from typing import Any

from .. import errors
from .._client import Call, Client
from .._schedule_client import Schedule
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

    schedule = commands.add_parser(
        "schedule",
        help="create, list, pause, resume and delete schedules",
        description="Schedules call a function at the times of a cron expression or at a "
        "fixed interval; each firing is an ordinary call, made once.",
    )
    actions = schedule.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        parents=[api],
        help="create a schedule",
        description="Create a schedule that calls FUNCTION with ARGS (each as JSON).",
    )
    create.add_argument("function", metavar="FUNCTION", help="the function's registered name")
    create.add_argument("args", nargs="*", metavar="ARG", help="an argument, as JSON")
    timing = create.add_mutually_exclusive_group(required=True)
    timing.add_argument(
        "--cron", metavar="EXPR", help="cron expression: minute hour day-of-month month weekday"
    )
    timing.add_argument("--every", metavar="SECONDS", type=float, help="fixed interval")
    create.add_argument(
        "--tz", default="UTC", metavar="ZONE", help="time zone of --cron (default: UTC)"
    )
    create.add_argument(
        "--missed",
        choices=["skip", "once", "all"],
        default="skip",
        help="firings missed while the scheduler was down: skip them (default), make one "
        "for all, or make each",
    )
    create.add_argument("--id", help="the schedule's id (default: a random one)")
    create.add_argument(
        "--endpoint", help="URL of the endpoint (default: the scheduler's default endpoint)"
    )
    actions.add_parser("list", parents=[api], help="list the schedules")
    for action, text in (
        ("pause", "stop a schedule's firings until it is resumed"),
        ("resume", "resume a paused schedule"),
        ("delete", "delete a schedule"),
    ):
        parser = actions.add_parser(action, parents=[api], help=text)
        parser.add_argument("schedule_id", metavar="ID", help="the schedule's id")


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


def _describe(schedule: Schedule) -> str:
    if schedule.cron is not None:
        timing = f"cron {schedule.cron!r} {schedule.time_zone}"
    else:
        assert schedule.every is not None
        timing = f"every {schedule.every.total_seconds():g} s"
    state = "paused" if schedule.paused else f"next {schedule.next_firing:%Y-%m-%d %H:%M:%S} UTC"
    return f"{schedule.id}  {schedule.function}  {timing}  missed={schedule.missed}  {state}"


async def schedule_command(args: argparse.Namespace, console: Console, url: str, key: str) -> int:
    """Run ``dispatch-aio schedule ACTION ...``."""
    try:
        async with Client(api_url=url, api_key=key, env={}) as client:
            schedules = client.schedules
            match args.action:
                case "create":
                    values = [_json_value(text) for text in args.args]
                    try:
                        call = Call(args.function, tuple(values), endpoint=args.endpoint)
                    except ValueError as exc:
                        raise CliError(str(exc), code=2) from None
                    created = await schedules.create(
                        call,
                        cron=args.cron,
                        time_zone=args.tz,
                        every=args.every,
                        missed=args.missed,
                        id=args.id,
                    )
                    console.line(f"created {_describe(created)}")
                case "list":
                    found = await schedules.list()
                    for schedule in found:
                        console.line(_describe(schedule))
                    if not found:
                        console.line("no schedules", err=True)
                case "pause":
                    console.line(f"paused {_describe(await schedules.pause(args.schedule_id))}")
                case "resume":
                    console.line(f"resumed {_describe(await schedules.resume(args.schedule_id))}")
                case "delete":
                    await schedules.delete(args.schedule_id)
                    console.line(f"deleted {args.schedule_id}")
    except errors.ClientError as exc:
        raise CliError(exc.message or str(exc)) from None
    except errors.DispatchError as exc:
        raise CliError(str(exc)) from None
    return 0
