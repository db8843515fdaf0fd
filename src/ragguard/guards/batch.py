"""Cross-caller micro-batching: many callers' items, few upstream calls.

Callers :meth:`MicroBatcher.submit` a few items each (e.g. texts to embed); the batcher gathers the items of
concurrent callers that share a batch *key* (e.g. the model name) into one batch and sends it with one call of
``dispatch(key, items)``, which returns one result per item, in order. Each caller gets its own results back, in
its own order. Domain-free: a provider module says what a key, an item, a cost and an item error are.

Design (no background task; structured concurrency is kept):

* A batch is *open* for its key until it is full (``max_items`` items or ``max_cost``) or ``max_wait`` seconds
  (on the injected clock) after its first item. Only one batch per key is open; a caller whose items do not fit
  closes it and opens the next one, so one caller's items may span batches.
* The batch is sent from the task of one of its own callers: its *leader* (the first caller still waiting)
  sleeps the ``max_wait`` timer; when the timer ends, or when a caller fills the batch, the first of its waiting
  callers to see it closed *claims* it, takes one of ``max_in_flight`` send slots (first come, first served) and
  calls ``dispatch``. No other task runs the call, so nothing outlives the callers and no event loop is bound at
  construction (events are made lazily, in the waiting task, aiolimiter#292).
* Cancel safety: while other callers still wait for the batch, the claimer sends it inside a shielded cancel
  scope, so its own anyio (or trio) cancellation takes effect only once the call returned and the others have
  their results. When the claimer is the batch's last caller the call is not shielded and is cancelled with it.
  The shield is bounded by the claimer's own deadline: a shared send still running then is cut, and the items
  it did not settle fail with :class:`~ragguard.DeadlineExceeded` for every caller (their deadlines are alike
  in practice, and a re-send would only start another call as late). anyio's shield cannot stop asyncio's own
  ``task.cancel()`` (``asyncio.timeout()``, ``wait_for``): a send interrupted that way is *put back* — the
  items it did not settle go to another caller of the batch, which sends them again (one more upstream call,
  never a lost result); the cancelled claimer's cancellation propagates. The send stays in a caller's task (no
  detached task), so a dispatch always runs in the task of a caller that needs it. A leader cancelled during
  the timer, or a claimer cancelled while waiting for a slot, hands the role on to another caller of the
  batch. A caller that leaves an unsent batch withdraws its items (an item another caller still needs
  stays); a batch nobody needs any more is dropped unsent. After every caller left, the batcher
  holds no state for the batch (:attr:`MicroBatcher.open_batches` and :attr:`MicroBatcher.in_flight` are 0).
* Duplicates: equal (hashable) items in one batch are sent once and the result is given to each caller that
  asked (an unhashable item is never merged).
* Errors: an exception from ``dispatch`` reaches every caller of that batch. When ``is_item_error(exc)`` says it
  may come from one bad item (e.g. a provider's 400), the batch is split in halves and each half sent again
  (recursively, down to single items, one half after the other within the batch's slot), so only the callers of
  the bad items get the error: ``1 + 2·log2(n)`` calls for one bad item among ``n``, ``2n - 1`` at most.
* A single item whose cost alone exceeds ``max_cost`` can never be sent: that caller alone gets
  :class:`BatchItemTooLarge`, before any of its items joins a batch.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._sync import run_in_worker, run_sync
from ..config import BatchingPolicy
from ..errors import DeadlineExceeded, RagGuardError

__all__ = ["BatchItemTooLarge", "BatchingPolicy", "MicroBatcher", "batched"]

Item = TypeVar("Item")
Result = TypeVar("Result")

_OPEN, _READY, _CLAIMED, _SENDING, _DONE = range(5)

#: ``batch.results.get`` default: an item the batch has no result for
_NO_RESULT: Any = object()


class BatchItemTooLarge(RagGuardError, ValueError):
    """One item costs more than a whole batch may (``max_cost``), so it can never be sent.

    Attributes:
        index: the item's position in the caller's ``items``.
        cost: the item's cost.
        max_cost: the batcher's cap.
    """

    def __init__(self, index: int, cost: float, max_cost: float) -> None:
        super().__init__(f"item {index} costs {cost:g}, more than a whole batch may ({max_cost:g})")
        self.index = index
        self.cost = cost
        self.max_cost = max_cost


class _Unhashable:
    """A stand-in key for an item that cannot be hashed: never equal to another, so never merged."""

    __slots__ = ()


class _Slot:
    __slots__ = ("cost", "item", "refs")

    def __init__(self, item: Any, cost: float) -> None:
        self.item = item
        self.cost = cost
        self.refs = 1


class _Batch:
    __slots__ = ("callers", "cost", "errors", "event", "key", "leader", "opened", "results", "slots", "state", "timer")

    def __init__(self, key: Hashable, opened: float) -> None:
        self.key = key
        self.opened = opened
        self.state = _OPEN
        # item key -> slot, in arrival order (the order sent)
        self.slots: dict[Hashable, _Slot] = {}
        self.cost = 0.0
        self.callers = 0
        self.leader = False
        self.timer: anyio.CancelScope | None = None
        self.event: anyio.Event | None = None
        self.results: dict[Hashable, Any] = {}
        self.errors: dict[Hashable, BaseException] = {}

    def wake(self) -> None:
        """Wake every caller waiting on the batch, so each looks at its state again."""
        if self.event is not None:
            self.event.set()
            self.event = None

    async def wait(self) -> None:
        if self.event is None:
            self.event = anyio.Event()
        await self.event.wait()


class _SlotWaiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class MicroBatcher(Generic[Item, Result]):
    """Gathers concurrent callers' items into batches and sends each batch with one ``dispatch`` call.

    Args:
        dispatch: ``await dispatch(key, items) -> results``: one upstream call for a batch key and its
            (deduplicated) items; returns one result per item, in the same order.
        max_items: items per batch (``>= 1``).
        max_cost: total ``cost`` per batch (``> 0``; ``None``: no cap), e.g. tokens.
        max_wait: seconds (on ``clock``) a batch waits for more items after its first one (``>= 0``).
        max_in_flight: batches sent at once (``>= 1``).
        enabled: ``False`` sends each caller's items as they are, one ``dispatch`` per caller.
        cost: the cost of one item (default ``0``).
        is_item_error: whether an exception of ``dispatch`` may be caused by one bad item (then the batch is
            halved to isolate it); default: never.
        clock: the clock of ``max_wait`` and deadlines.

    Attributes (counters): ``batches_sent`` (``dispatch`` calls, halves included), ``items_sent``,
    ``items_submitted``, ``duplicates_merged``.

    Raises:
        pydantic.ValidationError: an invalid setting, naming the field.

    Example::

        batcher = MicroBatcher(embed_many, max_items=2048, cost=count_tokens)
        vectors = await batcher.submit("text-embedding-3-small", ["hello", "world"])
    """

    __slots__ = (
        "_cost",
        "_dispatch",
        "_enabled",
        "_in_flight",
        "_is_item_error",
        "_max_cost",
        "_max_in_flight",
        "_max_items",
        "_max_wait",
        "_open",
        "_slot_waiters",
        "batches_sent",
        "clock",
        "duplicates_merged",
        "items_sent",
        "items_submitted",
        "policy",
    )

    def __init__(
        self,
        dispatch: Callable[[Hashable, list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_items: int = 2048,
        max_cost: float | None = 300_000,
        max_wait: float = 0.005,
        max_in_flight: int = 8,
        enabled: bool = True,
        cost: Callable[[Item], float] | None = None,
        is_item_error: Callable[[Exception], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        policy = BatchingPolicy(
            enabled=enabled, max_items=max_items, max_cost=max_cost, max_wait=max_wait, max_in_flight=max_in_flight
        )
        #: the validated settings
        self.policy = policy
        self.clock = clock
        self._dispatch = dispatch
        self._cost = cost
        self._is_item_error = is_item_error
        self._enabled = policy.enabled
        self._max_items = policy.max_items
        self._max_cost = math.inf if policy.max_cost is None else policy.max_cost
        self._max_wait = policy.max_wait
        self._max_in_flight = policy.max_in_flight
        self._open: dict[Hashable, _Batch] = {}
        self._in_flight = 0
        self._slot_waiters: deque[_SlotWaiter] = deque()
        self.batches_sent = 0
        self.items_sent = 0
        self.items_submitted = 0
        self.duplicates_merged = 0

    @classmethod
    def from_policy(
        cls,
        policy: BatchingPolicy,
        dispatch: Callable[[Hashable, list[Item]], Awaitable[Sequence[Result]]],
        *,
        cost: Callable[[Item], float] | None = None,
        is_item_error: Callable[[Exception], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> MicroBatcher[Item, Result]:
        """A batcher with the settings of a :class:`BatchingPolicy`."""
        return cls(dispatch, **policy.model_dump(), cost=cost, is_item_error=is_item_error, clock=clock)

    def __repr__(self) -> str:
        return (
            f"MicroBatcher(open_batches={len(self._open)}, in_flight={self._in_flight}/{self._max_in_flight}, "
            f"batches_sent={self.batches_sent}, items_sent={self.items_sent})"
        )

    @property
    def open_batches(self) -> int:
        """Batches open for more items (one per key at most)."""
        return len(self._open)

    @property
    def in_flight(self) -> int:
        """Send slots taken (batches being sent, or handed a slot and about to be)."""
        return self._in_flight

    async def submit(self, key: Hashable, items: Sequence[Item], *, deadline: float = math.inf) -> list[Result]:
        """Send ``items`` with other callers' items of the same ``key``; return one result per item, in order.

        Args:
            key: the batch key; only items of equal keys share a batch (e.g. the model name).
            items: this caller's items.
            deadline: the time (on ``clock``) by which to give up waiting (default: never).

        Raises:
            BatchItemTooLarge: one item costs more than ``max_cost``; no item of this caller was sent.
            DeadlineExceeded: ``deadline`` passed before the results came (measured in real time from the
                clock's remaining time), or the shared call sending this caller's items was cut at the deadline
                of the caller sending it.
            RagGuardError: the batch ended without a result for one of the items (not expected: a typed error
                rather than a lost result).
            Whatever ``dispatch`` raised for the batch (or, with ``is_item_error``, for this caller's first
            bad item).
        """
        if not items:
            return []
        self.items_submitted += len(items)
        if not self._enabled:
            self.batches_sent += 1
            self.items_sent += len(items)
            return list(await self._dispatch(key, list(items)))
        cost_of = self._cost
        max_cost = self._max_cost
        costs = [0.0] * len(items) if cost_of is None else [float(cost_of(item)) for item in items]
        for index, item_cost in enumerate(costs):
            if item_cost > max_cost:
                raise BatchItemTooLarge(index, item_cost, max_cost)
        remaining = deadline - self.clock.now()
        if remaining <= 0:
            raise DeadlineExceeded("micro-batch: the deadline passed before the items were submitted")
        refs = self._place(key, items, costs)
        batches: list[_Batch] = []
        for batch, _ in refs:
            if not batches or batches[-1] is not batch:
                batches.append(batch)
        done = 0
        try:
            if remaining == math.inf:
                for batch in batches:
                    await self._await(batch, math.inf)
                    done += 1
            else:
                end = anyio.current_time() + remaining
                with anyio.CancelScope(deadline=end) as scope:
                    for batch in batches:
                        await self._await(batch, end)
                        done += 1
                if scope.cancelled_caught:
                    raise DeadlineExceeded(
                        f"micro-batch: no results within the deadline ({remaining:.3f} s)", timeout=remaining
                    )
            out: list[Result] = []
            for batch, item_key in refs:
                error = batch.errors.get(item_key)
                if error is not None:
                    raise error
                result = batch.results.get(item_key, _NO_RESULT)
                if result is _NO_RESULT:
                    raise RagGuardError("micro-batch: the batch ended without a result for this caller's item")
                out.append(result)
            return out
        finally:
            self._leave(refs, batches, done)

    def _place(self, key: Hashable, items: Sequence[Item], costs: list[float]) -> list[tuple[_Batch, Hashable]]:
        """Add the items to the open batch of ``key`` (closing full ones); return (batch, item key) per item."""
        refs: list[tuple[_Batch, Hashable]] = []
        batch = self._open.get(key)
        joined: _Batch | None = None
        for item, item_cost in zip(items, costs, strict=True):
            item_key: Hashable
            try:
                hash(item)
                item_key = cast(Hashable, item)
            except TypeError:  # a list, or a tuple holding one
                item_key = _Unhashable()
            if batch is not None:
                slot = batch.slots.get(item_key)
                if slot is not None:
                    slot.refs += 1
                    self.duplicates_merged += 1
                    refs.append((batch, item_key))
                    if joined is not batch:
                        batch.callers += 1
                        joined = batch
                    continue
                if len(batch.slots) + 1 > self._max_items or batch.cost + item_cost > self._max_cost:
                    self._close(batch)
                    batch = None
            if batch is None:
                batch = _Batch(key, self.clock.now())
                self._open[key] = batch
            batch.slots[item_key] = _Slot(item, item_cost)
            batch.cost += item_cost
            refs.append((batch, item_key))
            if joined is not batch:
                batch.callers += 1
                joined = batch
        if batch is not None and len(batch.slots) >= self._max_items:
            self._close(batch)
        return refs

    def _close(self, batch: _Batch) -> None:
        """No more items join ``batch``: it is ready to be claimed and sent."""
        if batch.state != _OPEN:
            return
        batch.state = _READY
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
        batch.wake()

    async def _await(self, batch: _Batch, end: float) -> None:
        """Wait until ``batch`` is done, taking the leader's or the sender's role when it falls to this caller
        (``end``: the caller's deadline in ``anyio.current_time()`` seconds, ``math.inf`` for none)."""
        while batch.state != _DONE:
            if batch.state == _READY:
                await self._send_batch(batch, end)
            elif batch.state == _OPEN and not batch.leader:
                await self._lead(batch)
            else:
                await batch.wait()

    async def _lead(self, batch: _Batch) -> None:
        """Sleep the batch's ``max_wait`` timer, then close it (unless a filling caller closed it first)."""
        batch.leader = True
        try:
            with anyio.CancelScope() as timer:
                batch.timer = timer
                await self.clock.sleep(batch.opened + self._max_wait - self.clock.now())
        finally:
            batch.timer = None
            batch.leader = False
            # if this caller is leaving, another one takes the timer over
            batch.wake()
        self._close(batch)

    async def _send_batch(self, batch: _Batch, end: float) -> None:
        batch.state = _CLAIMED
        try:
            await self._acquire_slot()
        except BaseException:
            # cancelled while waiting for a slot: another caller of the batch claims it
            batch.state = _READY
            batch.wake()
            raise
        settled = False
        try:
            batch.state = _SENDING
            slots, results, errors = batch.slots, batch.results, batch.errors
            # all of them, unless an interrupted send was put back: then only the items it did not settle
            keys = [k for k in slots if k not in results and k not in errors] if results or errors else list(slots)
            shared = batch.callers > 1
            if keys:
                items = [slots[k].item for k in keys]
                if shared:
                    # shield the shared call from this caller's cancellation while others wait for it, up to
                    # this caller's own deadline (which it must not overrun)
                    with anyio.CancelScope(shield=True, deadline=end) as cut:
                        await self._send(batch, keys, items)
                    if cut.cancelled_caught:
                        error = DeadlineExceeded("micro-batch: the batch's call was cut at its sender's deadline")
                        for k in keys:
                            if k not in results and k not in errors:
                                errors[k] = error
                else:
                    await self._send(batch, keys, items)
            settled = True
            if shared:
                # the others have their results: now deliver a cancellation this caller received meanwhile
                await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._release_slot()
            # Not settled: this caller was cancelled during the send (unshielded, or by asyncio's own
            # task.cancel(), which anyio's shield does not stop). Put the batch back so another of its callers
            # sends what is left; with none left, _leave drops it.
            batch.state = _DONE if settled else _READY
            batch.wake()

    async def _send(self, batch: _Batch, keys: list[Hashable], items: list[Any]) -> None:
        """One ``dispatch`` call; on an item error, isolate the bad item(s) by halving."""
        self.batches_sent += 1
        self.items_sent += len(items)
        telemetry.batch_flushed("micro_batch", len(items), batch.callers)
        try:
            results = list(await self._dispatch(batch.key, items))
            if len(results) != len(items):
                raise RagGuardError(f"micro-batch: dispatch returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(items) > 1 and self._is_item_error is not None and self._is_item_error(exc):
                half = len(items) // 2
                await self._send(batch, keys[:half], items[:half])
                await self._send(batch, keys[half:], items[half:])
            else:
                for k in keys:
                    batch.errors[k] = exc
            return
        batch.results.update(zip(keys, results, strict=True))

    def _leave(self, refs: list[tuple[_Batch, Hashable]], batches: list[_Batch], done: int) -> None:
        """The caller is done with its batches: withdraw its items from the unsent ones, drop unneeded ones."""
        unfinished = {id(b) for b in batches[done:] if b.state != _DONE}
        if unfinished:
            for batch, item_key in refs:
                if id(batch) in unfinished and batch.state in (_OPEN, _READY, _CLAIMED):
                    slot = batch.slots[item_key]
                    slot.refs -= 1
                    if slot.refs == 0:
                        del batch.slots[item_key]
                        batch.cost -= slot.cost
        for batch in batches:
            batch.callers -= 1
            if batch.state in (_OPEN, _READY) and batch.callers == 0:
                # nobody needs this batch any more: drop it unsent
                if self._open.get(batch.key) is batch:
                    del self._open[batch.key]
                if batch.timer is not None:
                    batch.timer.cancel()
                batch.state = _DONE
            batch.wake()

    async def _acquire_slot(self) -> None:
        if self._in_flight < self._max_in_flight and not self._slot_waiters:
            self._in_flight += 1
            return
        waiter = _SlotWaiter()
        self._slot_waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release_slot()  # pass the slot handed to us on
            else:
                self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        if self._slot_waiters:
            # hand the slot over directly so a newcomer cannot overtake the queue
            waiter = self._slot_waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            self._in_flight -= 1


# --- decorator -----------------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _call_key(kwargs: dict[str, Any]) -> Hashable | None:
    key = tuple(sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:
        return None  # unhashable arguments: this call cannot be matched with others
    return key


def batched(
    *,
    cost: Callable[[Any], float] | None = None,
    is_item_error: Callable[[Exception], bool] | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Micro-batch a function that takes a list of items and returns one result per item, in order.

    The decorated ``fn(items, **kwargs)`` (async, or sync through the sync bridge) keeps its signature: each
    caller passes its own list and gets exactly its own results back, while concurrent callers' items are sent
    together in as few calls of ``fn`` as the limits allow (see :class:`MicroBatcher`). Calls with different
    keyword arguments are never batched together (the keyword arguments are the batch key); a call whose keyword
    arguments are unhashable calls ``fn`` directly. Extra positional arguments are not allowed. The wrapper's
    ``.batcher`` attribute is the :class:`MicroBatcher` (for its counters).

    Example::

        @ragguard.batched(max_items=256, max_wait=0.01)
        async def embed_many(texts: list[str], *, model: str) -> list[list[float]]: ...

        vector = (await embed_many(["one text"], model="text-embedding-3-small"))[0]

    Args:
        cost: the cost of one item (for ``max_cost``), e.g. its tokens.
        is_item_error: whether an exception of ``fn`` may come from one bad item (the batch is then split to
            isolate it, and only that item's caller gets the error).
        **options: :class:`MicroBatcher` settings: ``max_items``, ``max_cost``, ``max_wait`` (seconds),
            ``max_in_flight``, ``enabled``, ``clock``.

    Raises:
        pydantic.ValidationError: (when decorating) an invalid setting, naming the field.
        BatchItemTooLarge: (from a call) one of the caller's items costs more than ``max_cost``.
        Whatever ``fn`` raises for the caller's batch.
    """

    async def _unused(_: Hashable, items: list[Any]) -> list[Any]:
        return items

    MicroBatcher(_unused, cost=cost, is_item_error=is_item_error, **options)  # validate now, when decorating

    def apply(fn: F) -> F:

        is_async = inspect.iscoroutinefunction(fn)

        async def dispatch(key: Hashable, items: list[Any]) -> Sequence[Any]:
            kwargs = dict(cast(tuple[tuple[str, Any], ...], key))
            if is_async:
                results = await fn(items, **kwargs)
            else:
                results = await run_in_worker(fn, items, **kwargs)
            if not isinstance(results, Sequence) or len(results) != len(items):
                raise RagGuardError(
                    f"{getattr(fn, '__qualname__', fn)!s} returned {type(results).__name__} for {len(items)} items; "
                    "a batched function must return one result per item, in order"
                )
            return results

        batcher: MicroBatcher[Any, Any] = MicroBatcher(dispatch, cost=cost, is_item_error=is_item_error, **options)

        if is_async:

            @functools.wraps(fn)
            async def async_wrapper(items: Sequence[Any], /, **kwargs: Any) -> list[Any]:
                key = _call_key(kwargs)
                if key is None:
                    return list(await fn(items, **kwargs))
                return await batcher.submit(key, items)

            async_wrapper.batcher = batcher  # type: ignore[attr-defined]
            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(items: Sequence[Any], /, **kwargs: Any) -> list[Any]:
            key = _call_key(kwargs)
            if key is None:
                return list(fn(items, **kwargs))
            return run_sync(lambda: batcher.submit(key, items))

        sync_wrapper.batcher = batcher  # type: ignore[attr-defined]
        return cast(F, sync_wrapper)

    return apply
