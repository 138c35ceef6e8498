"""The durable engine: runs one RunRequest on a deterministic, replayable event loop.

It knows nothing about HTTP; the endpoint hands it requests and sends back
its responses.
"""

from ._context import (
    ATTEMPT,
    TailCall,
    current_run,
    deprecate_patch,
    durable_call,
    get_logger,
    in_durable_function,
    now,
    patched,
    random,
    run_on_host,
    uuid4,
)
from ._journal import JOURNAL_TYPE_URL, JOURNAL_VERSION
from ._loop import Clock, DurableLoop
from ._runner import Detection, DivergencePolicy, JournalCheck, Run, Runner

__all__ = [
    "ATTEMPT",
    "JOURNAL_TYPE_URL",
    "JOURNAL_VERSION",
    "Clock",
    "Detection",
    "DivergencePolicy",
    "DurableLoop",
    "JournalCheck",
    "Run",
    "Runner",
    "TailCall",
    "current_run",
    "deprecate_patch",
    "durable_call",
    "get_logger",
    "in_durable_function",
    "now",
    "patched",
    "random",
    "run_on_host",
    "uuid4",
]
