# examples/approval.py
#
# An order that waits for a person's approval, and a report made every night: durable
# events and schedules in an aiohttp application.
#
#     dispatch-aio run -- python examples/approval.py
#
# `place_order` suspends in `wait_event` until someone approves or rejects the order on
# the form at /approve/<order> (or runs `dispatch-aio send-event approval-<order>
# '{"approved": true, "by": "ann"}'`). Waiting costs nothing, survives restarts of the
# app and of the scheduler, and ends after 24 hours: the order is then cancelled. The
# app also creates a schedule that runs `nightly_report` at 02:00 UTC.
#
# To end by itself, the app places an order, fills in the form as a browser would and
# prints the outcome. Run it with `--serve` to keep serving instead.
import asyncio
import html
import sys

import aiohttp
from aiohttp import web

import dispatch_aio
from dispatch_aio import Dispatch
from dispatch_aio.errors import EventAlreadyResolvedError

dispatch = Dispatch()
routes = web.RouteTableDef()

APPROVAL_TIMEOUT = 24 * 3600  # seconds an order waits for a decision


@dispatch.function
async def charge(order_id: str, amount: int) -> str:
    return f"order {order_id}: charged {amount} EUR"


@dispatch.function
async def cancel(order_id: str, reason: str) -> str:
    return f"order {order_id}: cancelled ({reason})"


@dispatch.function
async def place_order(order_id: str, amount: int) -> str:
    try:
        decision = await dispatch_aio.wait_event(f"approval-{order_id}", timeout=APPROVAL_TIMEOUT)
    except TimeoutError:
        return await cancel(order_id, "not approved within 24 h")
    if decision["approved"]:
        return await charge(order_id, amount)
    return await cancel(order_id, f"rejected by {decision['by']}")


@dispatch.function
async def nightly_report() -> str:
    return f"nightly report of {dispatch_aio.now():%Y-%m-%d}"


@routes.post("/orders")
async def new_order(request: web.Request) -> web.Response:
    form = await request.post()
    dispatch_id = await place_order.dispatch(str(form["order"]), int(str(form["amount"])))
    return web.json_response({"dispatch_id": dispatch_id}, status=202)


@routes.get("/approve/{order}")
async def approval_form(request: web.Request) -> web.Response:
    order = html.escape(request.match_info["order"])
    return web.Response(
        content_type="text/html",
        text=f"""<form method="post">
  <p>Order {order}</p>
  <label>Your name <input name="by" required></label>
  <button name="decision" value="approve">Approve</button>
  <button name="decision" value="reject">Reject</button>
</form>""",
    )


@routes.post("/approve/{order}")
async def approve(request: web.Request) -> web.Response:
    order, form = request.match_info["order"], await request.post()
    decision = {"approved": form.get("decision") == "approve", "by": str(form.get("by", ""))}
    try:
        await dispatch.client.send_event(f"approval-{order}", decision)
    except EventAlreadyResolvedError:
        return web.Response(status=409, text=f"order {order} was decided already")
    return web.Response(text=f"order {order}: decision recorded")


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes(routes)
    app.add_routes(dispatch.routes())  # POST /dispatch.sdk.v1.FunctionService/Run
    app.cleanup_ctx.append(dispatch.cleanup_ctx)
    return app


async def main() -> None:
    host, port = dispatch.endpoint_addr()  # DISPATCH_ENDPOINT_ADDR
    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        # Created at every start: the same id and definition leave it as it is.
        report = await dispatch.client.schedules.create(
            nightly_report, cron="0 2 * * *", id="nightly-report"
        )
        print(f"schedule {report.id}: {report.cron!r} {report.time_zone}")
        if "--serve" in sys.argv:
            print(f"serving on http://{host}:{port}/approve/<order>; Ctrl+C stops")
            await asyncio.Event().wait()
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as session:
            order = {"order": "A17", "amount": "120"}
            async with session.post(f"{base}/orders", data=order) as response:
                dispatch_id = (await response.json())["dispatch_id"]
            async with session.get(f"{base}/approve/A17") as response:
                print(f"GET /approve/A17 -> {response.status}")
            answer = {"by": "ann", "decision": "approve"}
            async with session.post(f"{base}/approve/A17", data=answer) as response:
                print(f"POST /approve/A17 -> {response.status}: {await response.text()}")
            async with session.post(f"{base}/approve/A17", data=answer) as response:
                print(f"POST /approve/A17 -> {response.status}: {await response.text()}")
        print(await dispatch.client.result(dispatch_id))
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
