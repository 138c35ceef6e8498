"""Schedules through the client: ``dispatch.client.schedules.create(...)`` and the rest."""

from __future__ import annotations

__all__ = ["Schedule", "ScheduleClient"]

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from google.protobuf.message import DecodeError, Message

from . import errors
from .durable import in_durable_function, run_on_host
from .proto.v1 import schedule_pb2

if TYPE_CHECKING:
    from ._client import Call, Client
    from ._function import Function

SCHEDULE_PREFIX = "/dispatch_aio.v1.ScheduleService/"
_M = TypeVar("_M", bound=Message)

MissedPolicy = Literal["skip", "once", "all"]

_MISSED: dict[str, schedule_pb2.MissedPolicy.ValueType] = {
    "skip": schedule_pb2.MISSED_POLICY_SKIP,
    "once": schedule_pb2.MISSED_POLICY_ONCE,
    "all": schedule_pb2.MISSED_POLICY_ALL,
}
_MISSED_NAMES = {value: name for name, value in _MISSED.items()}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule, as the scheduler keeps it."""

    id: str
    """Names the schedule."""
    function: str
    """The function each firing calls."""
    cron: str | None
    """The cron expression, or None for an interval."""
    time_zone: str
    """The time zone the cron expression is read in ("UTC" for an interval)."""
    every: timedelta | None
    """The interval, or None for a cron expression."""
    missed: MissedPolicy
    """What happens to the firings missed while the scheduler was down."""
    paused: bool
    next_firing: datetime
    """When it fires next (if not paused), in UTC."""
    created: datetime
    endpoint: str
    """The endpoint of the calls ("": the scheduler's default endpoint)."""

    @classmethod
    def _from_proto(cls, spec: schedule_pb2.Schedule) -> Schedule:
        cron = spec.cron.expression if spec.WhichOneof("timing") == "cron" else None
        every = spec.interval.ToTimedelta() if spec.WhichOneof("timing") == "interval" else None
        return cls(
            id=spec.id,
            function=spec.function,
            cron=cron,
            time_zone=(spec.cron.time_zone or "UTC") if cron is not None else "UTC",
            every=every,
            missed=_MISSED_NAMES.get(spec.missed, "skip"),  # type: ignore[arg-type]
            paused=spec.paused,
            next_firing=spec.next_firing.ToDatetime(UTC),
            created=spec.create_time.ToDatetime(UTC),
            endpoint=spec.endpoint,
        )


class ScheduleClient:
    """The schedules of dispatch_aio's scheduler: ``dispatch.client.schedules``.

    Each firing of a schedule is an ordinary call of its function, with the arguments
    given at creation, and an idempotency key made of the schedule id and the firing
    time, so a firing is never made twice. Schedules are kept in the scheduler's
    database and survive its restarts.
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    async def create(
        self,
        call: Call | Function[[], Any],
        *,
        cron: str | None = None,
        time_zone: str = "UTC",
        every: float | timedelta | None = None,
        missed: MissedPolicy = "skip",
        id: str | None = None,
    ) -> Schedule:
        """Create a schedule that calls a function at the times of `cron` or `every`.

        ::

            await dispatch.client.schedules.create(
                Call(report.name, ("daily",)), cron="0 2 * * *", time_zone="Europe/Paris",
                id="nightly-report",
            )

        Creating a schedule again with the same id and definition returns it unchanged,
        so an application may create its schedules each time it starts.

        Args:
            call: What each firing calls: a `Call` (function, arguments, endpoint), or a
                registered function that takes no arguments.
            cron: A cron expression, five fields (minute hour day-of-month month
                day-of-week), read in `time_zone`.
            time_zone: An IANA time zone name (``"Europe/Paris"``); UTC by default.
            every: An interval instead of `cron`, in seconds (at least 1) or a
                timedelta; firings are counted from the creation.
            missed: What happens to the firings missed while the scheduler was down
                (more than a minute late): ``"skip"`` drops them, ``"once"`` makes one
                firing for all of them, ``"all"`` makes each of them (up to 1000).
            id: Names the schedule (up to 128 printable characters); a random one by
                default.

        Returns:
            The schedule, with its next firing time.

        Raises:
            ValueError: Neither or both of `cron` and `every`, or an unknown policy.
            dispatch_aio.errors.ClientError: The scheduler refused the schedule
                (``invalid_argument``: bad expression or time zone;
                ``already_exists``: another schedule has the id).
        """
        from ._client import Call  # imported here: _client imports this module

        if (cron is None) == (every is None):
            raise ValueError("give a schedule either cron= or every=, not both or neither")
        if missed not in _MISSED:
            raise ValueError(f"invalid missed={missed!r}: use 'skip', 'once' or 'all'")
        if not isinstance(call, Call):
            call = Call(call.name)
        spec = schedule_pb2.Schedule(
            id=id or "", function=call.function, missed=_MISSED[missed], version=call.version
        )
        spec.input.CopyFrom(call._input)
        if cron is not None:
            spec.cron.expression = cron
            spec.cron.time_zone = "" if time_zone.upper() == "UTC" else time_zone
        else:
            seconds = every.total_seconds() if isinstance(every, timedelta) else every
            assert seconds is not None
            spec.interval.FromNanoseconds(round(seconds * 1e9))
        if call.endpoint is not None:
            spec.endpoint = call.endpoint
        elif self._client._local() is None:
            spec.endpoint = self._client._optional_endpoint()
        # else: the embedded scheduler's default, the application's own endpoint as it is
        # configured when each firing is made.
        request = schedule_pb2.CreateScheduleRequest(schedule=spec)
        reply = await self._rpc("CreateSchedule", request, schedule_pb2.Schedule())
        return Schedule._from_proto(reply)

    async def list(self) -> list[Schedule]:
        """Return every schedule, oldest first."""
        reply = await self._rpc(
            "ListSchedules",
            schedule_pb2.ListSchedulesRequest(),
            schedule_pb2.ListSchedulesResponse(),
        )
        return [Schedule._from_proto(spec) for spec in reply.schedules]

    async def pause(self, schedule_id: str) -> Schedule:
        """Stop a schedule's firings until `resume`; return it.

        Raises:
            dispatch_aio.errors.ClientError: ``not_found``: no schedule has the id.
        """
        request = schedule_pb2.ScheduleRequest(id=schedule_id)
        return Schedule._from_proto(
            await self._rpc("PauseSchedule", request, schedule_pb2.Schedule())
        )

    async def resume(self, schedule_id: str) -> Schedule:
        """Resume a paused schedule at its first firing after now; return it.

        Raises:
            dispatch_aio.errors.ClientError: ``not_found``: no schedule has the id.
        """
        request = schedule_pb2.ScheduleRequest(id=schedule_id)
        return Schedule._from_proto(
            await self._rpc("ResumeSchedule", request, schedule_pb2.Schedule())
        )

    async def delete(self, schedule_id: str) -> None:
        """Delete a schedule; the calls it made already are left as they are.

        Raises:
            dispatch_aio.errors.ClientError: ``not_found``: no schedule has the id.
        """
        request = schedule_pb2.ScheduleRequest(id=schedule_id)
        await self._rpc("DeleteSchedule", request, schedule_pb2.DeleteScheduleResponse())

    async def _rpc(self, method: str, request: Message, reply: _M) -> _M:
        client = self._client
        local = client._local()
        if local is not None:
            work = _local_rpc(local.schedules, method, request, reply)
        else:
            work = self._http(method, request, reply)
        if in_durable_function():
            return await run_on_host(work)
        return await work

    async def _http(self, method: str, request: Message, reply: _M) -> _M:
        client = self._client
        url = client._config.api_url() + SCHEDULE_PREFIX + method
        # Every schedule request may be sent twice: creating, pausing, resuming and
        # deleting again change nothing more (a deleted schedule is then not found).
        idempotent = method != "DeleteSchedule"
        payload = await client._post(
            url, client._config.api_key(), request.SerializeToString(), client._timeout,
            idempotent=idempotent,
        )  # fmt: skip
        try:
            reply.ParseFromString(payload)
        except DecodeError as exc:
            raise errors.InvalidResponseError(
                f"the scheduler at {url} answered with a body that is not a "
                f"{type(reply).__name__} ({exc})"
            ) from None
        return reply


async def _local_rpc(schedules: Any, method: str, request: Message, reply: _M) -> _M:
    """Call the embedded scheduler's `Schedules`, mapping its errors as the API does."""
    from .scheduler._schedules import ScheduleExistsError, ScheduleNotFoundError
    from .scheduler._timing import InvalidScheduleError
    from .scheduler.store import StoreError

    try:
        match method:
            case "CreateSchedule":
                assert isinstance(request, schedule_pb2.CreateScheduleRequest)
                reply.CopyFrom(await schedules.create(request.schedule))
            case "ListSchedules":
                assert isinstance(reply, schedule_pb2.ListSchedulesResponse)
                reply.schedules.extend(schedules.list())
            case "PauseSchedule" | "ResumeSchedule":
                assert isinstance(request, schedule_pb2.ScheduleRequest)
                change = schedules.pause if method == "PauseSchedule" else schedules.resume
                reply.CopyFrom(await change(request.id))
            case "DeleteSchedule":
                assert isinstance(request, schedule_pb2.ScheduleRequest)
                await schedules.delete(request.id)
    except InvalidScheduleError as exc:
        raise errors.ClientError(str(exc), http_status=400, code="invalid_argument") from None
    except ScheduleExistsError as exc:
        raise errors.ClientError(str(exc), http_status=409, code="already_exists") from None
    except ScheduleNotFoundError as exc:
        raise errors.ClientError(str(exc), http_status=404, code="not_found") from None
    except (RuntimeError, StoreError) as exc:  # closing, or the database failed
        raise errors.ClientError(str(exc), http_status=503, code="unavailable") from None
    return reply
