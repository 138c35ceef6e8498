"""Policies of a function: retries, attempt timeout, expiration, concurrency and rate.

Declared with ``@dispatch.function(retry=..., timeout=..., ...)``, a policy travels with
every call of the function in ``Call.policy`` (field 1000, a
``dispatch_aio.v1.FunctionPolicy``), which other schedulers skip, and the expiration in
the protocol's own ``Call.expiration``. dispatch_aio's scheduler stores it with the call
and applies it. The scheduler's own `RetryPolicy` default is the same class.

Why with each call rather than a manifest the scheduler fetches from the endpoint: the
scheduler knows the policy from a call's first attempt, even while the application is
down, with no extra request that could fail or go stale; the three ways to run
(in process, ``dispatch-aio run``, a separate server) carry it the same way; and a
stored call keeps the policy it was made under across scheduler restarts. The cost:
calls that another program builds by hand carry no policy unless given one
(``Call(policy=...)``); they share the function's concurrency and rate limits, which
the scheduler takes from the latest policy it saw for the function.
"""

from __future__ import annotations

__all__ = [
    "FunctionPolicy",
    "RateLimit",
    "RetryPolicy",
    "apply_policy",
    "describe_policy",
    "seconds",
]

import math
import random
from dataclasses import dataclass
from datetime import timedelta

from ._status import Status
from .proto.sdk.v1 import call_pb2, status_pb2
from .proto.v1 import policy_pb2


def seconds(value: float | timedelta | None, what: str) -> float | None:
    """Return a duration in seconds; `value` must be positive (None stays None).

    Raises:
        ValueError: The duration is not positive or not finite; the message names `what`.
    """
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not (out > 0 and math.isfinite(out)):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return out


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of a call whose attempts fail, and the backoff between them.

    The delay before retry n (1-based) has the upper bound
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))``, of which the fraction
    `jitter` is drawn at random: 1 (the default) draws the delay uniformly from
    ``[0, bound]``, 0 waits the bound exactly.

    ::

        @dispatch.function(retry=RetryPolicy(max_attempts=3, initial_backoff=1.0))
        async def charge(order_id: str) -> None: ...
    """

    max_attempts: int = 10
    """Attempts in a row that the function may answer with a retried status before its
    last answer becomes the call's result, error included (so its caller receives the
    exception the function raised); 0 retries until the call expires. Attempts that get
    no answer from the function (endpoint unreachable, HTTP error) are not counted: those
    are retried until the call expires. An attempt that outlives the function's
    ``timeout`` counts, as a TIMEOUT."""
    initial_backoff: float = 0.1
    """Upper bound of the first delay, in seconds."""
    max_backoff: float = 30.0
    """Upper bound of any delay, in seconds."""
    multiplier: float = 2.0
    """Growth of the upper bound per consecutive failure."""
    jitter: float = 1.0
    """Fraction of the delay drawn at random, from 0 (none) to 1 (full jitter)."""
    retry_on: frozenset[Status] | None = None
    """The statuses that are retried; None: the temporary ones (`Status.temporary`:
    TIMEOUT, THROTTLED, TEMPORARY_ERROR and the DNS, TCP, TLS and HTTP errors).
    INCOMPATIBLE_STATE always restarts the call from its input."""

    def __post_init__(self) -> None:
        if not (0 <= self.initial_backoff <= self.max_backoff):
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff <= max_backoff, got "
                f"{self.initial_backoff} and {self.max_backoff}"
            )
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be at least 1, got {self.multiplier}")
        if self.max_attempts < 0:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 0, got {self.max_attempts}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be between 0 and 1, got {self.jitter}")
        if self.retry_on is not None:
            if isinstance(self.retry_on, (str, Status)) or not all(
                isinstance(s, Status) for s in self.retry_on
            ):
                raise TypeError(
                    "RetryPolicy.retry_on must be a frozenset of dispatch_aio.Status values, "
                    f"got {self.retry_on!r}"
                )
            object.__setattr__(self, "retry_on", frozenset(self.retry_on))

    def retries(self, status: Status) -> bool:
        """Whether an attempt that ended with `status` is retried."""
        if self.retry_on is None:
            return status.temporary
        return status in self.retry_on

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Return the delay before the retry that follows `failures` failures."""
        exponent = min(max(failures - 1, 0), 1000)
        try:
            cap = self.initial_backoff * self.multiplier**exponent
        except OverflowError:
            cap = math.inf
        bound = min(self.max_backoff, cap)
        return rng.uniform(bound * (1 - self.jitter), bound)

    def to_proto(self) -> policy_pb2.RetryPolicy:
        """Return the wire form (``dispatch_aio.v1.RetryPolicy``)."""
        message = policy_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
            multiplier=self.multiplier,
            jitter=self.jitter,
        )
        if self.retry_on is not None:
            message.retry_on_given = True
            message.retry_on.extend(
                status_pb2.Status.ValueType(s) for s in sorted(int(s) for s in self.retry_on)
            )
        return message

    @classmethod
    def from_proto(cls, message: policy_pb2.RetryPolicy) -> RetryPolicy:
        """Rebuild a policy from its wire form.

        Raises:
            ValueError: The message holds values a policy does not accept.
        """
        retry_on = None
        if message.retry_on_given:
            known = {int(s) for s in Status}
            retry_on = frozenset(Status(s) for s in message.retry_on if s in known)
        return cls(
            max_attempts=message.max_attempts,
            initial_backoff=message.initial_backoff,
            max_backoff=message.max_backoff,
            multiplier=message.multiplier,
            jitter=message.jitter,
            retry_on=retry_on,
        )


@dataclass(frozen=True, slots=True)
class RateLimit:
    """How often the runs of a function may start, across the scheduler (a token bucket).

    Each first run and each retry takes a token; tokens come back at `per_second` a
    second, and at most `burst` are kept. A run without a token waits (it is not
    failed). Resumes of a suspended function take none.

    ::

        @dispatch.function(rate_limit=RateLimit(per_second=5, burst=10))
        async def call_partner_api(item: str) -> None: ...
    """

    per_second: float
    """Tokens added per second."""
    burst: int = 1
    """Tokens kept at most: how many runs may start at once after a quiet time."""

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise ValueError(f"RateLimit.per_second must be positive, got {self.per_second!r}")
        if self.burst < 1:
            raise ValueError(f"RateLimit.burst must be at least 1, got {self.burst!r}")


@dataclass(frozen=True, slots=True)
class FunctionPolicy:
    """Everything ``@dispatch.function`` declares about how its calls run.

    Built by `Dispatch.function` from its arguments (see there for their meaning) and
    carried by each call of the function. A call built by hand may carry one of its own:
    ``Call("charge", (order,), policy=FunctionPolicy(timeout=5.0))``.
    """

    retry: RetryPolicy | None = None
    timeout: float | None = None
    expiration: float | None = None
    concurrency: int | None = None
    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "timeout", seconds(self.timeout, "timeout"))
        object.__setattr__(self, "expiration", seconds(self.expiration, "expiration"))
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"retry must be a dispatch_aio.RetryPolicy, got {self.retry!r}")
        if self.rate_limit is not None and not isinstance(self.rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a dispatch_aio.RateLimit, got {self.rate_limit!r}")
        if self.concurrency is not None and (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or self.concurrency < 1
        ):
            raise ValueError(
                f"concurrency must be a positive int (or None), got {self.concurrency!r}"
            )

    @property
    def is_default(self) -> bool:
        """Whether the policy declares nothing (calls then carry none)."""
        return self == FunctionPolicy()

    def to_proto(self) -> policy_pb2.FunctionPolicy:
        """Return the wire form, without the expiration (it goes in ``Call.expiration``)."""
        message = policy_pb2.FunctionPolicy(concurrency=self.concurrency or 0)
        if self.retry is not None:
            message.retry.CopyFrom(self.retry.to_proto())
        if self.timeout is not None:
            message.timeout.FromNanoseconds(round(self.timeout * 1e9))
        if self.rate_limit is not None:
            message.rate_limit.per_second = self.rate_limit.per_second
            message.rate_limit.burst = self.rate_limit.burst
        return message


def apply_policy(call: call_pb2.Call, policy: FunctionPolicy) -> None:
    """Give a call its function's policy, and its expiration unless the call has one."""
    if policy.is_default:
        return
    if policy.expiration is not None and not call.HasField("expiration"):
        call.expiration.FromNanoseconds(round(policy.expiration * 1e9))
    message = policy.to_proto()
    if message.ByteSize():
        call.policy.CopyFrom(message)


def describe_policy(message: policy_pb2.FunctionPolicy) -> str:
    """Say on one line what a call's policy sets ("" when it sets nothing)."""
    parts: list[str] = []
    if message.HasField("retry"):
        retry = message.retry
        attempts = f"{retry.max_attempts} attempts" if retry.max_attempts else "until it expires"
        parts.append(
            f"retry {attempts}, backoff {retry.initial_backoff:g} to {retry.max_backoff:g} s "
            f"x{retry.multiplier:g}"
        )
        if retry.retry_on_given:
            names = sorted(Status(s).name.lower() for s in retry.retry_on)
            parts[-1] += " on " + (", ".join(names) or "no status")
    if message.HasField("timeout"):
        parts.append(f"timeout {message.timeout.ToNanoseconds() / 1e9:g} s per attempt")
    if message.concurrency:
        parts.append(f"at most {message.concurrency} at once")
    if message.HasField("rate_limit"):
        rate = message.rate_limit
        parts.append(f"{rate.per_second:g} starts/s (burst {rate.burst})")
    return "; ".join(parts)
