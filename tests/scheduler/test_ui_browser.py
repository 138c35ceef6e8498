"""The web UI in a real headless Chromium, against a scheduler running a real app.

Screenshots of each step are saved in the test's temporary folder.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from browser import Browser, chromium, find_browser

from dispatch_aio._codec import decode_value
from dispatch_aio.proto.v1 import schedule_pb2
from dispatch_aio.scheduler._ui import ui_address

from .ui_workload import API_KEY, SCRIPT, Workload, serve_workload

FOUND = find_browser()
pytestmark = pytest.mark.skipif(isinstance(FOUND, str), reason=str(FOUND))

ROWS = "return Array.from(document.querySelectorAll('#calls tbody tr'), r => r.dataset.id)"
ROW_STATES = (
    "return Array.from(document.querySelectorAll('#calls tbody tr'), "
    "r => [r.cells[0].textContent, r.dataset.state])"
)


@pytest.fixture
async def workload() -> AsyncIterator[Workload]:
    async with serve_workload() as served:
        yield served


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert not isinstance(FOUND, str)
    async with chromium(*FOUND) as session:
        yield session


async def test_the_ui_shows_calls_a_tree_and_escaped_values(
    workload: Workload, browser: Browser, tmp_path: Path
) -> None:
    fanout = await workload.submit("fanout", 3)
    shout = await workload.submit("shout")
    explode = await workload.submit("explode", "top")
    for dispatch_id in (fanout, shout, explode):
        await workload.finish(dispatch_id)
    waiting = await workload.submit("waits", "w")

    await browser.get(ui_address(workload.api_url, API_KEY))
    await browser.wait_for(ROWS + ".length === 4")
    assert await browser.run(ROWS) == [waiting, explode, shout, fanout]
    assert await browser.run(ROW_STATES) == [
        ["waits", "suspended"],
        ["explode", "invalid_argument"],
        ["shout", "ok"],
        ["fanout", "ok"],
    ]
    # The key left the address bar for this tab's storage.
    assert await browser.run("return location.hash") == ""
    assert await browser.run("return sessionStorage.getItem('dispatch-aio-key')") == API_KEY
    await browser.screenshot(tmp_path / "1-calls.png")

    # A call's tree and timeline.
    await browser.click(f'#calls tr[data-id="{fanout}"]')
    await browser.wait_for("return document.querySelectorAll('#d-tree .node').length === 6")
    nodes = await browser.run(
        "return Array.from(document.querySelectorAll('#d-tree .node strong'), n => n.textContent)"
    )
    assert nodes == ["fanout", "square", "square", "square", "explode", "shout"]
    assert await browser.run("return document.querySelectorAll('#d-timeline .bar').length") == 6
    assert await browser.text("#d-input") == "(3)"
    assert await browser.run("return document.querySelectorAll('#d-attempts tbody tr').length") > 1
    assert SCRIPT in await browser.text("#d-output")
    await browser.screenshot(tmp_path / "2-tree.png")

    # An output that is markup shows as text, and runs nothing.
    shout_child = await browser.run(
        "return Array.from(document.querySelectorAll('#d-tree .node'))"
        ".find(n => n.querySelector('strong').textContent === 'shout').dataset.id"
    )
    await browser.click(f'#d-tree .node[data-id="{shout_child}"]')
    await browser.wait_for(
        "return document.getElementById('d-function').textContent === 'shout'"
        " && document.getElementById('d-output').textContent"
    )
    assert await browser.run("return document.getElementById('d-output').textContent") == repr(
        SCRIPT
    )
    assert await browser.run("return document.querySelectorAll('script').length") == 1
    assert not await browser.alert_open()

    # An error, with its traceback: markup in the message stays text.
    explode_child = await browser.run(
        "return Array.from(document.querySelectorAll('#d-tree .node'))"
        ".find(n => n.querySelector('strong').textContent === 'explode').dataset.id"
    )
    await browser.click(f'#d-tree .node[data-id="{explode_child}"]')
    await browser.wait_for("return !document.getElementById('d-error-box').hidden")
    assert await browser.text("#d-error") == "ValueError: <b>child</b> went wrong"
    assert await browser.run("return document.querySelector('#detail b')") is None
    await browser.click("#d-trace-box summary")
    trace = await browser.text("#d-trace")
    assert trace.startswith("Traceback")
    assert "ValueError: <b>child</b> went wrong" in trace
    await browser.screenshot(tmp_path / "3-error.png")

    # Live: the suspended call finishes while the page is open.
    await browser.click(f'#calls tr[data-id="{waiting}"]')
    await browser.wait_for("return document.getElementById('d-function').textContent === 'waits'")
    assert await browser.text("#d-state") == "suspended"
    await browser.screenshot(tmp_path / "4-suspended.png")
    workload.release.set()
    await workload.finish(waiting)
    started = time.monotonic()
    # The list and the open call's detail refresh from separate requests: wait for both.
    await browser.wait_for(
        f"return document.querySelector('#calls tr[data-id=\"{waiting}\"]').dataset.state === 'ok'"
        " && document.getElementById('d-state').textContent === 'ok'"
    )
    assert time.monotonic() - started < 5  # refreshed by itself, about every second
    assert await browser.text("#d-output") == "'w'"

    # Filters.
    await browser.type("#function", "expl")
    await browser.wait_for(ROWS + ".length === 1")
    assert await browser.run(ROWS) == [explode]
    await browser.click("#top")  # children too
    await browser.wait_for(ROWS + ".length === 2")
    await browser.screenshot(tmp_path / "5-filtered.png")
    for name in ("1-calls", "2-tree", "3-error", "4-suspended", "5-filtered"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


async def test_the_ui_sends_an_event_and_cancels_a_call(
    workload: Workload, browser: Browser, tmp_path: Path
) -> None:
    approval = await workload.submit("approval", "o1")
    doomed = await workload.submit("waits", "x")
    await browser.get(ui_address(workload.api_url, API_KEY))
    await browser.wait_for(ROWS + ".length === 2")

    # The form resolves the event the approval waits for, with a JSON value.
    await browser.type("#ev-key", "approve-o1")
    await browser.type("#ev-value", '{"ok": true, "by": "<i>ann</i>"}')
    await browser.click("#ev-send")
    await browser.wait_for("return document.getElementById('ev-result').textContent")
    assert (await browser.text("#ev-result")).startswith('event "approve-o1" resolved')
    await workload.finish(approval)
    result = await workload.scheduler.wait(approval)
    assert decode_value(result.output) == {"ok": True, "by": "<i>ann</i>"}
    await browser.screenshot(tmp_path / "1-event-sent.png")
    # A second resolution of the key is refused, with the scheduler's words.
    await browser.type("#ev-key", "approve-o1")
    await browser.type("#ev-value", "false")
    await browser.click("#ev-send")
    await browser.wait_for(
        "return document.getElementById('ev-result').textContent.startsWith('not sent')"
    )
    assert "already resolved" in await browser.text("#ev-result")

    # Cancelling takes two clicks; the call ends cancelled.
    await browser.click(f'#calls tr[data-id="{doomed}"]')
    await browser.wait_for("return !document.getElementById('cancel').hidden")
    await browser.click("#cancel")
    assert await browser.text("#cancel") == "Click again to cancel"
    await browser.click("#cancel")
    await browser.wait_for(
        "return document.getElementById('d-action').textContent.startsWith('cancelled')"
    )
    await workload.finish(doomed)
    assert (await workload.scheduler.wait(doomed)).error.type == "dispatch_aio.CancelledCallError"
    await browser.wait_for("return document.getElementById('cancel').hidden")
    await browser.screenshot(tmp_path / "2-cancelled.png")
    assert not await browser.alert_open()


async def test_the_ui_lists_schedules_and_pauses_one(
    workload: Workload, browser: Browser, tmp_path: Path
) -> None:
    spec = schedule_pb2.Schedule(id="reports", function="shout", endpoint=workload.endpoint)
    spec.interval.FromNanoseconds(3600 * 10**9)
    await workload.scheduler.schedules.create(spec)
    await browser.get(ui_address(workload.api_url, API_KEY))
    row = "document.querySelector('#schedules tr[data-id=\"reports\"]')"
    await browser.wait_for(f"return {row} !== null")
    assert "every 3600 s" in await browser.text('#schedules tr[data-id="reports"]')
    await browser.click('#schedules tr[data-id="reports"] button')
    await browser.wait_for(f"return {row}.dataset.paused === 'true'")
    assert workload.scheduler.schedules.list()[0].paused
    await browser.screenshot(tmp_path / "schedules.png")


async def test_a_wrong_key_asks_for_the_key(workload: Workload, browser: Browser) -> None:
    await workload.finish(await workload.submit("shout"))
    await browser.get(ui_address(workload.api_url, "not-the-key"))
    await browser.wait_for("return !document.getElementById('signin').hidden")
    assert await browser.run(ROWS) == []
    await browser.type("#keyinput", API_KEY)
    await browser.click("#keyform button")
    await browser.wait_for(ROWS + ".length === 1")
