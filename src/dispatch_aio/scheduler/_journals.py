"""The journals of unfinished calls, read from the store for InspectService.ListJournals.

``dispatch-aio check`` replays them against new code; through the API it can do so
while the scheduler runs and holds its database.
"""

from __future__ import annotations

__all__ = ["PAGE", "stored_journals"]

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from ..proto.v1 import inspect_pb2, journal_pb2
from .store import CallQuery, Phase, StateKind, Store

PAGE = 100
_JOURNAL_URL = "type.googleapis.com/" + journal_pb2.Journal.DESCRIPTOR.full_name


async def stored_journals(store: Store, after: int) -> tuple[list[inspect_pb2.StoredJournal], int]:
    """Return a page of journals of calls created after creation number `after`.

    Returns:
        The journals, and the creation number to pass as `after` for the next page
        (0 when there is none).
    """
    query = CallQuery(phases=(Phase.PENDING, Phase.SUSPENDED), after=after, limit=PAGE)
    rows = await store.list_calls(query)
    journals = []
    for _, rec in rows:
        journal = b""
        if rec.state_kind is StateKind.SEGMENTS:
            journal = b"".join(await store.read_segments(rec.id))
        elif rec.state_kind is StateKind.TYPED:
            try:
                wrapped = any_pb2.Any.FromString(rec.state)
            except DecodeError:
                continue
            if wrapped.type_url != _JOURNAL_URL:
                continue  # the state of another SDK's function: not a journal
            journal = wrapped.value
        else:
            continue
        journals.append(
            inspect_pb2.StoredJournal(dispatch_id=rec.id, function=rec.function, journal=journal)
        )
    return journals, rows[-1][0] if len(rows) == PAGE else 0
