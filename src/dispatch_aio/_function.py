"""Function: a registered async function, called durably inside a run and in process outside."""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar

from ._codec import encode_input
from ._policy import FunctionPolicy
from ._sync import EXECUTORS, Executor, ProcessPools, sync_runner
from .durable import DivergencePolicy, TailCall, durable_call, in_durable_function
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._dispatch import Dispatch

__all__ = ["FUNCTION_NAME", "DispatchOptions", "Function", "check_function_name"]

P = ParamSpec("P")
R = TypeVar("R")

# The protocol's function name pattern; '-' is not allowed.
FUNCTION_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_<>.]*")


def check_function_name(name: str) -> str:
    """Return ``name`` if the protocol accepts it as a function name.

    Raises:
        ValueError: The name does not match ``^[a-zA-Z_][a-zA-Z0-9_<>.]*$``.
    """
    if not FUNCTION_NAME.fullmatch(name):
        raise ValueError(
            f"invalid function name {name!r}: names must match ^[a-zA-Z_][a-zA-Z0-9_<>.]*$ "
            "(letters, digits, '_', '.', '<', '>'; no '-'); pass name= to choose another"
        )
    return name


def _call_site(depth: int) -> str:
    frame = sys._getframe(depth + 1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class Function(Generic[P, R]):
    """A registered function: an ``async def`` durable function, or a plain ``def`` leaf.

    Inside a function run by Dispatch, calling it makes a durable call: the
    scheduler runs it (possibly elsewhere) and its result is journaled.
    Outside, calling it simply runs the function in process. ``await
    fn.dispatch(...)`` submits a call through the Dispatch API.

    Functions are created by ``@dispatch.function``, which ties them to their
    `Dispatch` object (its API client and endpoint).

    ``on_divergence`` chooses what happens to a call of this function whose replay
    diverges from its journal (its code changed under it, or it depends on something
    that is not replayed): ``"restart"`` runs the call again from its input (its
    side effects run again), ``"fail"`` ends it with `errors.NondeterminismError`.
    None (the default) leaves the choice to the application.

    A plain ``def`` function is a leaf: each call runs it whole in a thread
    (``executor="thread"``, the default) or in a process of a pool
    (``executor="process"``), and calling it returns an awaitable like any other
    function. It cannot make durable calls (it does not run in a durable function:
    a `Function` called there runs in process, and ``sleep`` blocks), and a failed
    call runs it again from the start.
    """

    __wrapped__: Callable[..., Any]
    """The decorated function, as written."""

    def __init__(
        self,
        fn: Callable[P, Coroutine[Any, Any, R]] | Callable[P, R],
        name: str | None = None,
        *,
        owner: Dispatch | None = None,
        on_divergence: DivergencePolicy | None = None,
        policy: FunctionPolicy | None = None,
        executor: Executor | None = None,
    ) -> None:
        if on_divergence not in (None, "restart", "fail"):
            raise ValueError(
                f"on_divergence must be 'restart', 'fail' or None, not {on_divergence!r}"
            )
        if executor is not None and executor not in EXECUTORS:
            raise ValueError(f"executor must be 'thread' or 'process', not {executor!r}")
        qualname = getattr(fn, "__qualname__", None)
        if not callable(fn) or qualname is None:
            raise TypeError(f"{fn!r} is not a function: register an `async def` or a `def`")
        if inspect.iscoroutinefunction(fn):
            if executor is not None:
                raise TypeError(
                    f"{qualname!r} is an async function: executor= applies to plain `def` "
                    "functions only (an async function runs on the event loop)"
                )
            coro_fn: Callable[P, Coroutine[Any, Any, R]] = fn
        elif inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                f"{qualname!r} is a generator function: register an `async def` or a plain "
                "`def` that returns its result"
            )
        else:
            coro_fn = sync_runner(fn, executor or "thread", self._process_pools)
        self._sync = not inspect.iscoroutinefunction(fn)
        self._fn = coro_fn
        self._name = check_function_name(name if name is not None else fn.__qualname__)
        self._owner = owner
        self._on_divergence: DivergencePolicy | None = on_divergence
        self._policy = policy or FunctionPolicy()
        # Named, documented and introspected as the function it wraps (`inspect.signature`
        # follows `__wrapped__`); its own attributes are left alone.
        functools.update_wrapper(self, fn, updated=())

    @property
    def name(self) -> str:
        """The name the function is registered and called under."""
        return self._name

    @property
    def is_sync(self) -> bool:
        """Whether the function is a plain ``def`` run in a thread or a process."""
        return self._sync

    def _process_pools(self) -> ProcessPools | None:
        return None if self._owner is None else self._owner._process_pools()

    @property
    def on_divergence(self) -> DivergencePolicy | None:
        """The function's divergence policy; None leaves it to the application."""
        return self._on_divergence

    @property
    def policy(self) -> FunctionPolicy:
        """How the scheduler runs the function's calls: retries, timeout, limits."""
        return self._policy

    @property
    def fn(self) -> Callable[P, Coroutine[Any, Any, R]]:
        """The coroutine function: the undecorated one, or for a plain ``def`` its runner."""
        return self._fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """Call the function: durably inside a run, in process outside one."""
        if in_durable_function():
            input = encode_input(args, kwargs, function=self._name)
            return durable_call(self._name, input, call_site=_call_site(1))
        return self._fn(*args, **kwargs)

    async def dispatch(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Submit a call to this function through the Dispatch API; return its dispatch id.

        The call runs asynchronously: this returns once the API has recorded
        it, not when it finishes. The arguments are encoded when this is
        called (a single argument of a well-known type as itself, anything else
        pickled).

        Inside a durable function the call is made once: the submission carries an
        idempotency key named after the running call, its run and the number of
        submissions before it, so when the function replays (after a crash, in a
        new process) the submission returns the first one's dispatch id instead of
        creating the call again, within the scheduler's key retention (24 hours by
        default). A restart of the call from its input (a divergence) submits anew.
        ``await fn(...)`` makes a durable call and waits for its result.

        Returns:
            The dispatch id of the new call.

        Raises:
            RuntimeError: The function is not registered with a `Dispatch` object.
            dispatch_aio.errors.ConfigurationError: The API key or endpoint URL is
                missing or invalid.
            dispatch_aio.errors.ClientError: The Dispatch API refused the call.
            dispatch_aio.errors.DispatchError: The API could not be reached
                (`TCPError`, `DNSError`, `DispatchTimeoutError` ...).
        """
        return await self._submit(args, kwargs, idempotency_key=None)

    def with_options(self, *, idempotency_key: str | None = None) -> DispatchOptions[P, R]:
        """Return this function with submission options, for ``.dispatch(...)``.

        ::

            charge_once = charge.with_options(idempotency_key=f"charge-{order_id}")
            dispatch_id = await charge_once.dispatch(order_id)

        Args:
            idempotency_key: Key of the submission: dispatch_aio's scheduler creates the
                call once for every submission with this key within its retention period
                (24 hours by default), and answers each with the first one's dispatch id.
                None gives each submission a random key (its retries stay safe).

        Raises:
            ValueError: The key is empty, longer than 256 characters or not printable.
        """
        return DispatchOptions(self, idempotency_key=idempotency_key)

    async def _submit(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, idempotency_key: str | None
    ) -> str:
        owner = self._owner
        if owner is None:
            raise RuntimeError(
                f"{self._name}.dispatch(): the function is not registered with a Dispatch "
                "object; declare it with @dispatch.function"
            )
        from ._client import Call  # imported here: _client imports this module

        call = Call(self._name, args, kwargs, idempotency_key=idempotency_key, policy=self._policy)
        if owner._config.embedded() and owner._embedded is None:
            raise ConfigurationError(
                f"no scheduler to submit to: {self._name!r} is registered with a Dispatch "
                "object that does not run its scheduler (DISPATCH_API_URL is not set, so it "
                "runs its own, which is not started); submit while `dispatch.run()` or `await "
                "dispatch.start()` runs, with the function registered on that Dispatch object "
                "(@dispatch.function), or set DISPATCH_API_URL to use a separate scheduler "
                "(`dispatch-aio run -- python app.py` sets it)",
                variable="DISPATCH_API_URL",
            )
        (dispatch_id,) = await owner.client.dispatch([call])
        return dispatch_id

    def tail_call(self, *args: P.args, **kwargs: P.kwargs) -> NoReturn:
        """End the running durable function by handing its call over to this function.

        The scheduler runs this function with the given arguments under the
        same dispatch id; its result becomes the result of the original call.
        Only valid inside a function run by Dispatch::

            @dispatch.function
            async def countdown(n: int) -> str:
                if n == 0:
                    return "done"
                countdown.tail_call(n - 1)

        Raises:
            RuntimeError: Called outside a durable function.
        """
        if not in_durable_function():
            raise RuntimeError(f"{self._name}.tail_call() is only valid inside a durable function")
        raise TailCall(self._name, encode_input(args, kwargs, function=self._name))

    def __repr__(self) -> str:
        return f"<Function {self._name}>"


class DispatchOptions(Generic[P, R]):
    """A `Function` with submission options, made by `Function.with_options`."""

    def __init__(self, function: Function[P, R], *, idempotency_key: str | None) -> None:
        if idempotency_key is not None:
            from ._client import Call  # imported here: _client imports this module

            Call(function.name, idempotency_key=idempotency_key)  # checks the key now
        self._function = function
        self._idempotency_key = idempotency_key

    @property
    def idempotency_key(self) -> str | None:
        """The key of the submissions; None: a random one for each."""
        return self._idempotency_key

    async def dispatch(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Submit a call with these options, as `Function.dispatch` does.

        Returns:
            The dispatch id of the call: the first submission's when one with the same
            idempotency key was made within the scheduler's retention period.

        Raises:
            dispatch_aio.errors.DispatchError: As `Function.dispatch`.
        """
        return await self._function._submit(args, kwargs, idempotency_key=self._idempotency_key)

    def __repr__(self) -> str:
        return f"<DispatchOptions {self._function.name} idempotency_key={self._idempotency_key!r}>"
