"""Workflows used by the golden-journal and determinism tests.

Keep them stable: committed journals were recorded from them.
"""

from __future__ import annotations

import asyncio
import dataclasses

from dispatch_aio import durable
from dispatch_aio._function import Function


async def _square(x: int) -> int:
    return x * x


square = Function(_square, name="square")


async def _slow_square(x: int) -> int:
    await asyncio.sleep(30)
    return x * x


slow_square = Function(_slow_square, name="slow_square")


async def _mixed(n: int) -> dict[str, object]:
    # asyncio.wait, FIRST_COMPLETED, in a loop over many calls
    pending = {asyncio.create_task(square(i)) for i in range(n)}
    firsts: list[int] = []
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        firsts.extend(t.result() for t in done)
    # as_completed over calls
    completed = [await f for f in asyncio.as_completed([square(i) for i in range(n)])]
    # gather, a durable sleep and a timeout around a slow call
    gathered = await asyncio.gather(*(square(i) for i in range(3)))
    await asyncio.sleep(10)
    try:
        async with asyncio.timeout(5):
            late = await slow_square(3)
    except TimeoutError:
        late = -1
    return {
        "firsts": firsts,
        "completed": completed,
        "gathered": list(gathered),
        "late": late,
        "token": durable.uuid4().hex,
        "coin": durable.random() < 2,
    }


mixed = Function(_mixed, name="mixed")

FUNCTIONS = [square, slow_square, mixed]


# -- identity across processes ------------------------------------------------------------
# Not in FUNCTIONS (the golden journal's): these check that a value rebuilt in another
# process is of the program's own class, so isinstance and except take the right branch.


@dataclasses.dataclass(frozen=True)
class Reading:
    sensor: str
    celsius: float


class Overheated(Exception):
    def __init__(self, reading: Reading) -> None:
        super().__init__(reading)  # args are what unpickling passes back to __init__
        self.reading = reading

    def __str__(self) -> str:
        return f"{self.reading.sensor} at {self.reading.celsius} °C"


async def _measure(sensor: str) -> Reading:
    return Reading(sensor, 20.0 + len(sensor))


measure = Function(_measure, name="measure")


async def _check(reading: Reading) -> Reading:
    if reading.celsius > 25:
        raise Overheated(reading)
    return reading


check = Function(_check, name="check")


async def _survey(sensors: list[str]) -> dict[str, str]:
    report = {}
    for sensor in sensors:
        reading = await measure(sensor)
        if not isinstance(reading, Reading):  # a look-alike class would end up here
            report[sensor] = f"not a Reading: {type(reading)!r}"
            continue
        try:
            await check(reading)
        except Overheated as exc:
            report[sensor] = f"overheated {exc.reading.celsius}"
        except Exception as exc:  # a look-alike exception class would end up here
            report[sensor] = f"not caught as Overheated: {type(exc)!r}"
        else:
            report[sensor] = "ok"
    return report


survey = Function(_survey, name="survey")

IDENTITY_FUNCTIONS = [measure, check, survey]
