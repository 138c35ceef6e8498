"""Function names reserved by dispatch_aio's scheduler: wire facts shared by both sides."""

from __future__ import annotations

__all__ = ["MAX_EVENT_KEY_LENGTH", "WAIT_EVENT", "event_key_problem"]

WAIT_EVENT = "dispatch_aio.wait_event"
"""The function a call that waits for a durable event names; its input is the key (a
string). dispatch_aio's scheduler answers such a call itself and never runs it."""
MAX_EVENT_KEY_LENGTH = 256
"""Longest event key accepted, in characters."""


def event_key_problem(key: str) -> str | None:
    """What is wrong with an event key, or None if it is valid."""
    if not key:
        return "an event key must be a non-empty string"
    if len(key) > MAX_EVENT_KEY_LENGTH or not key.isprintable():
        return (
            f"invalid event key {key[:40]!r}: use at most {MAX_EVENT_KEY_LENGTH} "
            "printable characters"
        )
    return None
