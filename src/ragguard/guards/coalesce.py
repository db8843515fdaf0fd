"""Request coalescing (single-flight): identical concurrent calls share one upstream call.

The first caller of a key (the *leader*) starts the upstream call as a *flight*; callers of the same key that
arrive while it is in flight (*followers*) wait for it. Every waiter — leader included — gets the flight's
result, or has its exception raised. The flight is forgotten as soon as it completes, so a later call starts a
new one: this is not a cache (that is :class:`~ragguard.Cache`'s job).

Cancel safety (cashews' single-flight is not: one caller's cancellation cancels the shared call for all):

- a cancelled waiter leaves at once and its cancellation propagates unchanged, never swallowed;
- the other waiters still get the result, even when the leader is the one cancelled;
- when the last waiter leaves, the flight is cancelled, so no orphan work keeps running.

How: under structured concurrency a task cannot leave while a child it started still runs, so the flight cannot
run in any caller's task (nor in a task group one caller hosts) without tying it to that caller's cancel scope.
The flight therefore runs in a *detached* task that belongs to no caller — ``loop.create_task`` on asyncio,
``trio.lowlevel.spawn_system_task`` on trio (the one place a guard dispatches on the event loop, because anyio
has no detached spawn) — inside an :class:`anyio.CancelScope` that the last waiter to leave cancels. The task
runs in a copy of the leader's :mod:`contextvars` context (so tracing spans and the like follow the call). If
the event loop itself shuts down while a flight runs, the flight is cancelled with it and any waiter left gets
a :class:`RuntimeError`.

Errors are shared as the same exception object, re-raised in every waiter (its traceback gathers each waiter's
frames). Keys are any hashable value; a ``None`` key means "do not coalesce this call".

Threads and event loops: the in-flight map is guarded by a :class:`threading.Lock` held only for a dictionary
operation, never across the call. A flight belongs to the event loop that started it, so a caller on another
thread never joins it (it runs its call uncoalesced); sharing one coalescer across event loops is not supported
beyond that.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, ClassVar, Generic, TypeVar, cast

import anyio

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import CoalescePolicy
from .pipeline import GuardBase

__all__ = ["CoalescePolicy", "Coalescer", "coalesce"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: the ``ctx.extras`` entry the default key function reads
KEY_EXTRA = "coalesce_key"
#: the ``ctx.extras`` entry set to ``True`` for a follower (a call answered by another caller's flight), so
#: outer guards can tell, e.g. a :class:`~ragguard.Cache` fills an entry once, from the leader
FOLLOWER_EXTRA = "coalesced"


def _key_from_extras(ctx: CallContext) -> Hashable | None:
    extras = ctx.extras
    return extras.get(KEY_EXTRA) if extras else None


class _Flight(Generic[T]):
    """One upstream call in flight and the callers waiting for it."""

    __slots__ = ("done", "error", "event", "ok", "result", "scope", "task", "thread", "waiters")

    def __init__(self, thread: int) -> None:
        self.event = anyio.Event()
        self.scope = anyio.CancelScope()
        self.thread = thread
        self.waiters = 1
        self.done = False
        self.ok = False
        self.result: T | None = None
        self.error: BaseException | None = None
        # a strong reference to the asyncio task (the loop keeps only weak ones)
        self.task: object = None


def _spawn_detached(fn: Callable[[], Coroutine[Any, Any, None]]) -> object:
    """Start ``fn()`` in a task that belongs to no caller's cancel scope, in a copy of the current context.

    Returns the task object when there is one to keep alive (asyncio), else ``None``.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass  # trio is imported but this is not a trio run
        else:
            trio.lowlevel.spawn_system_task(fn, context=contextvars.copy_context())
            return None
    return asyncio.get_running_loop().create_task(fn())


class Coalescer(GuardBase):
    """Single-flight: concurrent calls with the same key share one upstream call (stage ``coalesce``).

    See the module docstring for the cancel-safety guarantees and how they are met.

    Args:
        enabled: ``False`` makes :meth:`run` a pass-through.
        max_keys: most keys in flight at once (``>= 1``); beyond it a call with a new key runs uncoalesced.
        key: ``key(ctx)`` returns the call's key, or ``None`` not to coalesce it (default:
            ``ctx.extras["coalesce_key"]`` when ``ctx.extras`` is set, else ``None``). Keys must be hashable
            (an unhashable key raises :class:`TypeError` from :meth:`run`).
        clock: the clock of the contexts :meth:`call` creates.

    Raises:
        pydantic.ValidationError: (from the constructor) an invalid setting, naming the field.

    From :meth:`run`: whatever the shared call raised (the same exception object in every waiter), the caller's
    own cancellation, or :class:`RuntimeError` if the event loop shut the flight down under a waiter.

    Attributes (telemetry):
        leaders: calls that started a flight.
        followers: calls that joined a flight already in the air.
    """

    stage: ClassVar[str] = "coalesce"
    __slots__ = ("_enabled", "_flights", "_key", "_lock", "_max_keys", "clock", "followers", "leaders", "policy")

    def __init__(
        self,
        *,
        enabled: bool = True,
        max_keys: int = 100_000,
        key: Callable[[CallContext], Hashable | None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.policy = CoalescePolicy(enabled=enabled, max_keys=max_keys)
        self._enabled = self.policy.enabled
        self._max_keys = self.policy.max_keys
        self._key: Callable[[CallContext], Hashable | None] = key if key is not None else _key_from_extras
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[Any]] = {}
        self.clock = clock
        self.leaders = 0
        self.followers = 0

    @classmethod
    def from_policy(
        cls,
        policy: CoalescePolicy,
        *,
        key: Callable[[CallContext], Hashable | None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Coalescer:
        """A coalescer with the settings of a :class:`CoalescePolicy` section (``enabled``, ``max_keys``; the
        guarded clients read the per-endpoint switches)."""
        return cls(enabled=policy.enabled, max_keys=policy.max_keys, key=key, clock=clock)

    @property
    def in_flight(self) -> int:
        """How many keys have a flight in the air."""
        return len(self._flights)

    def __repr__(self) -> str:
        return (
            f"Coalescer(enabled={self._enabled}, in_flight={len(self._flights)}/{self._max_keys}, "
            f"leaders={self.leaders}, followers={self.followers})"
        )

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call``, or wait for the identical call already in flight under the same key."""
        if not self._enabled:
            return await call()
        key = self._key(ctx)
        if key is None:
            return await call()
        thread = threading.get_ident()
        leader = False
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                if len(self._flights) < self._max_keys:
                    flight = self._flights[key] = _Flight(thread)
                    leader = True
                    self.leaders += 1
            elif flight.thread == thread:
                flight.waiters += 1
                self.followers += 1
            else:
                flight = None  # another thread's (so another loop's) flight: its event is not ours to await
        if flight is None:
            return await call()
        if not leader:
            telemetry.note_result(coalesced=True)
            extras = ctx.extras
            if extras is None:
                ctx.extras = {FOLLOWER_EXTRA: True}
            else:
                extras[FOLLOWER_EXTRA] = True
        else:
            try:
                flight.task = _spawn_detached(functools.partial(self._fly, flight, key, call))
            except BaseException:
                self._forget(flight, key)
                raise
        return cast(T, await self._wait(flight, key))

    def _forget(self, flight: _Flight[Any], key: Hashable) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]

    async def _fly(self, flight: _Flight[T], key: Hashable, call: Callable[[], Awaitable[T]]) -> None:
        """The flight's own task: run the call, publish its outcome, wake every waiter."""
        try:
            # cancelled by the last waiter to leave; the scope absorbs that cancellation
            with flight.scope:
                flight.result = await call()
                flight.ok = True
        except BaseException as exc:
            # delivered to the waiters; a cancellation from outside (event loop shutdown) is re-raised below
            flight.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                flight.done = True
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.event.set()

    async def _wait(self, flight: _Flight[T], key: Hashable) -> T:
        try:
            await flight.event.wait()
        except BaseException:
            # this caller leaves now (its cancellation propagates); the last one out grounds the flight
            with self._lock:
                flight.waiters -= 1
                abandoned = flight.waiters == 0 and not flight.done
                if abandoned and self._flights.get(key) is flight:
                    del self._flights[key]
            if abandoned:
                flight.scope.cancel()
            raise
        if flight.ok:
            return cast(T, flight.result)
        error = flight.error
        if isinstance(error, Exception):
            raise error
        raise RuntimeError("the shared call was cancelled from outside (event loop shutdown?)") from error


def _default_key(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    key = (name, args, tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None  # unhashable arguments: run this call on its own
    return key


def coalesce(
    key: Callable[..., Hashable | None] | None = None, *, coalescer: Coalescer | None = None, **options: Any
) -> Callable[[F], F]:
    """Decorate a function (async, or sync through the sync bridge) so identical concurrent calls share one call.

    Args:
        key: ``key(*args, **kwargs)`` gives a call's key, ``None`` not to coalesce it. Default: the function's
            qualified name, its positional arguments and its sorted keyword arguments, when all are hashable
            (otherwise that call is not coalesced).
        coalescer: share an existing :class:`Coalescer` (and read its counters) instead of making one per
            decorated function.
        **options: :class:`Coalescer` options (``max_keys``, ``enabled``, ``clock``) when it makes one.

    Use it called: ``@ragguard.coalesce()`` or ``@ragguard.coalesce(lambda q, **_: q.lower())``.

    Raises:
        pydantic.ValidationError: (when decorating) an invalid option, naming the field.
    """
    shared = coalescer if coalescer is not None else Coalescer(**options)  # validates now, when decorating

    def apply(fn: F) -> F:
        from ..decorators import guarded, qualified_name  # the decorators module imports the guards

        guard = shared if coalescer is not None else Coalescer(**options)
        name = qualified_name(fn)

        def extras(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            return {KEY_EXTRA: key(*args, **kwargs) if key is not None else _default_key(name, args, kwargs)}

        return guarded(guard, fn, extras=extras)

    return apply
