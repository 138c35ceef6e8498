"""dispatch-py's in-memory test scheduler (dispatch.test.Service) serving its API.

Run by the dispatch-py virtualenv's python. Prints `ready <API URL>`. The API accepts only
dispatch.test's fixed API key. It calls endpoints unsigned, ignores Poll's min_results,
max_results and max_wait, resumes a poller once with all the results of the calls of its
last Poll (at once when it made none), and retries temporary statuses without delay.
"""

import asyncio
import logging
import sys
import warnings

import dispatch.test

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
# dispatch.test.Service subclasses aiohttp's web.Application, which aiohttp deprecates.
warnings.simplefilter("ignore", DeprecationWarning)


async def main():
    service = dispatch.test.Service()
    async with dispatch.test.Server(service) as server:
        print("ready", server.url, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
