"""Per-function policies at the scheduler: their decoding, and concurrency and rate limits.

A call carries its function's policy (``Call.policy``, see policy.proto), stored with
the call. Retries and the attempt timeout apply to that call alone. Concurrency and
rate are limits of the function (its endpoint and name) across the scheduler: the
policy most recently seen for a function sets them, so a deployment that changes them
takes effect with its first call, and calls that carry no policy (submitted by hand or
by another SDK) share the function's limits.

`Limits.admit` is asked before each attempt. A call beyond the concurrency limit waits
in the function's queue (first come, first served) until an attempt of the function
ends; one without a rate token waits until the bucket has one. Neither fails a call.
The concurrency limit counts Run requests in flight: a suspended call holds no slot,
so a function may wait on calls of itself without deadlock.
"""

from __future__ import annotations

__all__ = ["Admission", "CallPolicy", "Limits", "parse_policy", "policy_problem"]

import collections
import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError

from .._policy import RateLimit, RetryPolicy
from ..proto.sdk.v1 import call_pb2
from ..proto.v1 import policy_pb2

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """The decoded ``dispatch_aio.v1.FunctionPolicy`` of a call."""

    retry: RetryPolicy | None = None
    timeout: float | None = None
    concurrency: int | None = None
    rate_limit: RateLimit | None = None


def _decode(message: policy_pb2.FunctionPolicy) -> CallPolicy:
    """Decode a policy; raise ValueError if it holds values a policy does not accept."""
    retry = RetryPolicy.from_proto(message.retry) if message.HasField("retry") else None
    timeout = None
    if message.HasField("timeout"):
        timeout = message.timeout.ToNanoseconds() / 1e9
        if timeout <= 0:
            raise ValueError(f"the attempt timeout must be positive, got {timeout:g} s")
    rate = None
    if message.HasField("rate_limit"):
        limit = message.rate_limit
        rate = RateLimit(per_second=limit.per_second, burst=limit.burst)
    return CallPolicy(retry, timeout, message.concurrency or None, rate)


def policy_problem(call: call_pb2.Call, where: str) -> str | None:
    """Return what is wrong with a call's policy, or None."""
    if not call.HasField("policy"):
        return None
    try:
        _decode(call.policy)
    except (ValueError, TypeError) as exc:
        return f"{where}.policy is invalid: {exc}"
    return None


def parse_policy(data: bytes) -> CallPolicy | None:
    """Decode the stored policy of a call (None when it has none, or it is unreadable)."""
    if not data:
        return None
    try:
        return _decode(policy_pb2.FunctionPolicy.FromString(data))
    except (DecodeError, ValueError, TypeError):
        return None


class Admission(enum.Enum):
    """What `Limits.admit` decided."""

    GO = "go"
    """Start the attempt now (a slot is taken: release it when the attempt ends)."""
    QUEUED = "queued"
    """Wait for a slot: `Limits.release` hands it over."""
    LATER = "later"
    """Wait for a rate token: ask again after `Limits.admit`'s delay."""


class _Function(Generic[T]):
    __slots__ = ("concurrency", "inflight", "rate", "stamp", "tokens", "waiting")

    def __init__(self) -> None:
        self.concurrency: int | None = None
        self.rate: RateLimit | None = None
        self.inflight = 0
        self.tokens = 0.0
        self.stamp = 0.0  # when `tokens` was last brought up to date
        self.waiting: collections.deque[T] = collections.deque()


class Limits(Generic[T]):
    """Concurrency slots and rate tokens of each function, with the calls waiting for them.

    `T` is the engine's handle of a call, queued while it waits for a slot.
    """

    def __init__(self) -> None:
        self._functions: dict[tuple[str, str], _Function[T]] = {}

    def learn(self, key: tuple[str, str], policy: CallPolicy | None) -> None:
        """Take the limits of a function from a call's policy (None: the call has none)."""
        if policy is None:
            return
        state = self._functions.get(key)
        if state is None:
            if policy.concurrency is None and policy.rate_limit is None:
                return
            state = self._functions[key] = _Function()
        if state.rate != policy.rate_limit and policy.rate_limit is not None:
            state.tokens = float(policy.rate_limit.burst)
            state.stamp = 0.0
        state.concurrency = policy.concurrency
        state.rate = policy.rate_limit

    def limited(self, key: tuple[str, str]) -> bool:
        """Whether the function has a limit at all."""
        state = self._functions.get(key)
        return state is not None and (state.concurrency is not None or state.rate is not None)

    def admit(
        self, key: tuple[str, str], call: T, *, takes_token: bool, now: float
    ) -> tuple[Admission, float]:
        """Decide whether an attempt of a call may start now.

        Args:
            key: The function (endpoint, name).
            call: The call, queued when no slot is free.
            takes_token: The attempt starts a run (first run, retry), which the rate
                limit counts; resumes do not.
            now: The current time, in seconds.

        Returns:
            The decision, and for `Admission.LATER` the seconds to wait.
        """
        state = self._functions.get(key)
        if state is None:
            return Admission.GO, 0.0
        if state.concurrency is not None and state.inflight >= state.concurrency:
            if call not in state.waiting:
                state.waiting.append(call)
            return Admission.QUEUED, 0.0
        if takes_token and state.rate is not None:
            rate = state.rate
            if state.stamp:
                elapsed = max(now - state.stamp, 0.0)
                state.tokens = min(float(rate.burst), state.tokens + elapsed * rate.per_second)
            state.stamp = now
            if state.tokens < 1.0:
                return Admission.LATER, (1.0 - state.tokens) / rate.per_second
            state.tokens -= 1.0
        state.inflight += 1
        return Admission.GO, 0.0

    def release(self, key: tuple[str, str]) -> list[T]:
        """End an attempt admitted with `Admission.GO`; return the calls to try again.

        The calls returned left the queue: each is admitted again (or queued again).
        """
        state = self._functions.get(key)
        if state is None:
            return []
        state.inflight = max(state.inflight - 1, 0)
        free = state.concurrency - state.inflight if state.concurrency is not None else None
        woken: list[T] = []
        while state.waiting and (free is None or len(woken) < free):
            woken.append(state.waiting.popleft())
        return woken

    def forget(self, key: tuple[str, str], call: T) -> None:
        """Take a call out of the function's queue (it was cancelled or finished)."""
        state = self._functions.get(key)
        if state is not None and call in state.waiting:
            state.waiting.remove(call)

    def inflight(self, key: tuple[str, str]) -> int:
        """Attempts of the function in flight that hold a slot."""
        state = self._functions.get(key)
        return state.inflight if state is not None else 0
