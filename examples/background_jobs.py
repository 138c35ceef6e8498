# examples/background_jobs.py
#
# Background jobs for several tenants: a nightly export that runs one job per tenant
# concurrently, in batches, pausing between batches to spare the tenants' databases.
#
#     dispatch-aio run -- python examples/background_jobs.py
#
# The pauses are durable sleeps: the jobs hold no memory or connection while they wait,
# and a restart in the middle resumes them where they were. `dispatch_aio.uuid4()` and
# `dispatch_aio.now()` give the same values when a function replays, and the logger of
# `dispatch_aio.get_logger` stays quiet while it replays.
import asyncio
import logging

import dispatch_aio
from dispatch_aio import Dispatch

dispatch = Dispatch()
log = dispatch_aio.get_logger("jobs")

RECORDS = {"acme": 250, "globex": 120, "initech": 180}  # records to export, per tenant
BATCH_SIZE = 100
PAUSE = 1.5  # seconds between two batches of a tenant


@dispatch.function
async def export_batch(tenant: str, job_id: str, offset: int) -> int:
    # A stand-in for the real work: read a page of the tenant's records, write it out.
    return min(BATCH_SIZE, RECORDS[tenant] - offset)


@dispatch.function
async def export_tenant(tenant: str) -> str:
    job_id = str(dispatch_aio.uuid4())[:8]
    started = dispatch_aio.now()
    log.info("job %s: exporting %s", job_id, tenant)
    exported = batches = 0
    for offset in range(0, RECORDS[tenant], BATCH_SIZE):
        if batches:
            await asyncio.sleep(PAUSE)
        exported += await export_batch(tenant, job_id, offset)
        batches += 1
    took = (dispatch_aio.now() - started).total_seconds()
    return f"{tenant}: {exported} records in {batches} batches ({took:.0f} s, job {job_id})"


@dispatch.function
async def nightly_export(tenants: list[str]) -> list[str]:
    # One job per tenant, all at once; if one fails, the group cancels the others.
    async with asyncio.TaskGroup() as group:
        jobs = [group.create_task(export_tenant(tenant)) for tenant in tenants]
    return [job.result() for job in jobs]


async def main() -> None:
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("jobs").setLevel(logging.INFO)
    async with await dispatch.start():
        dispatch_id = await nightly_export.dispatch(sorted(RECORDS))
        for line in await dispatch.client.result(dispatch_id):
            print(line)


if __name__ == "__main__":
    asyncio.run(main())
