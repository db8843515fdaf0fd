"""The distributed token bucket: requests-per-minute and tokens-per-minute for one bucket name, kept in Redis.

Model
-----
The same *reservation schedule* as the local :class:`~ragguard.RateLimiter` (the virtual-scheduling form of
GCRA; read its module docstring), run inside Redis by one Lua script on the Redis server's clock (``TIME``), so
every operation is **one round trip** and skewed client clocks cannot cheat. Every quantity is in *seconds of
refill*: a call costing ``requests`` and ``tokens`` costs ``requests·60/rpm`` and ``tokens·60/tpm`` seconds, and
a bucket's capacity is ``burst`` seconds for both buckets. The client computes the costs, so the instances
sharing a bucket must agree on ``rpm``, ``tpm`` and ``burst_seconds``.

Per bucket, one key (so one Redis Cluster slot) holds seven little-endian doubles (56 bytes, Lua
``struct.pack('<ddddddd', …)``; a 48-byte value written by an earlier version, without ``l``, is read with
``l = max(r, t) - s``, later than any reservation it holds):

- ``r``, ``t``: the theoretical arrival times of the requests and tokens buckets (server seconds since the
  epoch at which each would be full again; ``-1e300``: full since forever);
- ``p``: the server time until which a shared pause (a provider's Retry-After) holds every caller;
- ``s``: the total seconds shared pauses have pushed the schedule back (a waiting caller compares it with the
  value it saw when it reserved, to learn how far its own reservation moved);
- ``j``: the release jitter cap of the current pause, seconds;
- ``x``: the server time at which the key is already set to expire;
- ``l``: the latest time of a reservation made with a wait, less ``s`` then (what a cancelled reservation
  compares its own with, see below).

A packed string rather than a hash because the hot path is then three commands (``TIME``, ``GET``, ``SET``) with
no float formatting, and the expiry rides on the ``SET``: ``KEEPTTL`` while ``x`` is late enough, else ``PX``
moving it to two margins past the new horizon (so a busy bucket re-sets it about once a second). Measured on
Redis 6.2, the script costs about half the server time of the hash-with-``PEXPIRE`` version. Arguments travel
the same way: one binary argument, an operation byte and little-endian doubles.

Operations (:class:`RedisBucketStore`): ``reserve`` (admitted with the wait to sleep, the reservation made; or
refused with the exact wait, nothing reserved), ``check`` (the pause state, after a sleep), ``refund``, ``debit``
(reconciliation once the real usage is known), ``pause`` (shared Retry-After) and ``observe`` (lower-only, from
the provider's ``x-ratelimit-remaining-*``). Their semantics mirror ``RateLimiter._reserve``, ``_refund`` /
``_give_back``, ``debit``, ``_pause`` and ``observe``, with the server's ``TIME`` as *now*. The release jitter
after a pause is drawn by the client (a uniform number in ``[0, 1)`` passed in), because ``math.random`` in
Redis 6.2 scripts is deterministic.

Giving back a reservation whose caller was cancelled while waiting (``refund`` with the reservation's
:attr:`Reservation.slot`) follows Go's ``golang.org/x/time/rate`` ``Reservation.CancelAt``, as the local limiter
does: ``max(0, cost - (l - slot))`` seconds of refill, nothing once its time has come, so that no later
reservation (of any instance) shares its slot with a newcomer. A refund without a slot comes off the end of the
schedule whole: for the newest reservation, or tokens charged but not spent.

Fairness: reservations are FIFO in the order Redis executes the scripts. A caller told to wait already holds
its slot in the schedule; a newcomer's reservation is placed after every earlier one, so it can never overtake
a waiting caller, and nobody is starved however many newcomers arrive. (Across instances, the order is the
order in which their scripts reach Redis.)

Expiry: after every write the key expires between one and two seconds (:data:`EXPIRY_MARGIN`) past the time the
bucket is full again and any pause (with its jitter) is over; past that, a missing key means exactly what the
expired one did.

Errors: every operation raises :class:`~ragguard.BackendUnavailable` when Redis cannot answer within the
backend's ``timeout`` (the cause chained), as :meth:`~ragguard.RedisBackend.execute` does.
"""

from __future__ import annotations

import asyncio
import math
import struct
import sys
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
from redis.exceptions import NoScriptError, ResponseError

from ..errors import BackendUnavailable
from .redis import _redis_errors, unavailable_reply

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["BUCKET_SCRIPT", "EXPIRY_MARGIN", "BucketState", "RedisBucketStore", "Reservation"]

#: A bucket key outlives the moment it is full again (and its pause is over) by one to two such margins, seconds
#: (the script's ``MARGIN``).
EXPIRY_MARGIN = 1.0
#: Waits and budgets are capped at this many seconds on the wire.
_BIG = 1e18
#: "never set" for the times in the stored state.
NONE = -1e300
#: the slot of a plain refund (no reservation: off the end of the schedule, whole)
NO_SLOT = math.inf

BUCKET_SCRIPT = """
-- ragguard distributed token bucket (GCRA reservation schedule), see ragguard/backends/_redis_bucket.py.
-- KEYS[1]: the bucket, seven little-endian doubles r, t, p, s, j, x, l. ARGV[1]: an operation byte, then doubles.
-- Times are server seconds (TIME); costs, burst and levels are seconds of refill.
redis.replicate_commands()
local key = KEYS[1]
local arg = ARGV[1]
local op = string.sub(arg, 1, 1)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local r, t, p, s, j, x, l = -1e300, -1e300, -1e300, 0, 0, -1e300, -1e300
local raw = redis.call('GET', key)
if raw then
  if #raw == 48 then
    -- written by an earlier version, without l: no reservation goes after the bucket is full again
    r, t, p, s, j, x = struct.unpack('<dddddd', raw)
    l = math.max(r, t) - s
  else
    r, t, p, s, j, x, l = struct.unpack('<ddddddd', raw)
  end
end

-- The key must outlive the moment the bucket is full again and the pause is over, by MARGIN seconds. x is the
-- expiry time already set: when it is late enough, KEEPTTL (cheaper than re-setting the expiry on every
-- write); else the expiry moves to horizon + 2 MARGIN, so a busy bucket re-sets it about once per MARGIN.
local MARGIN = 1
local function store()
  local horizon = r
  if t > horizon then horizon = t end
  if p + j > horizon then horizon = p + j end
  if horizon < now then horizon = now end
  if x >= horizon + MARGIN then
    redis.call('SET', key, struct.pack('<ddddddd', r, t, p, s, j, x, l), 'KEEPTTL')
  else
    x = horizon + 2 * MARGIN
    redis.call('SET', key, struct.pack('<ddddddd', r, t, p, s, j, x, l), 'PX', math.ceil((x - now) * 1000))
  end
end

local function refund(req_cost, tok_cost, burst)
  local floor = now
  if p > now then floor = p + burst end
  if req_cost > 0 then
    r = r - req_cost
    if r < floor then r = floor end
  end
  if tok_cost > 0 then
    t = t - tok_cost
    if t < floor then t = floor end
  end
end

if op == 'R' then
  -- reserve: req_cost, tok_cost, burst, budget, jitter in [0,1), refund_req, refund_tok
  local req_cost, tok_cost, burst, budget, jitter, refund_req, refund_tok = struct.unpack('<ddddddd', arg, 2)
  local refunded = raw and (refund_req > 0 or refund_tok > 0)
  if refunded then refund(refund_req, refund_tok, burst) end
  -- a bucket holds a cost c (capped at capacity) from tat - burst + min(c, burst) on
  local at = now
  local ready = r - burst + math.min(req_cost, burst)
  if ready > at then at = ready end
  ready = t - burst + math.min(tok_cost, burst)
  if ready > at then at = ready end
  if p > at then at = p + jitter * j end
  local wait = at - now
  if wait <= budget or wait <= 0 then
    if r < at then r = at end
    if t < at then t = at end
    r = r + req_cost
    t = t + tok_cost
    if wait <= 0 then
      store()
      return 0
    end
    -- the slot: its time less the pause shift (a call admitted at once need not be tracked, see op F)
    local slot = at - s
    if slot > l then l = slot end
    store()
    return struct.pack('<ddddd', 1, wait, s, now, slot)
  end
  if refunded then store() end
  return struct.pack('<ddddd', 0, wait, s, now, math.huge)
elseif op == 'C' then
  return struct.pack('<dddddd', now, s, p, j, r, t)
elseif op == 'F' then
  -- refund: req_cost, tok_cost, burst, slot (a missing key is a full bucket: nothing to give back). A slot is a
  -- cancelled reservation's (Go's Reservation.CancelAt): nothing once its time has come, else the cost less how
  -- much later the latest reservation goes; math.huge: a plain refund, off the end of the schedule
  if not raw then return 0 end
  local req_cost, tok_cost, burst, slot = struct.unpack('<dddd', arg, 2)
  if slot < math.huge then
    if slot + s <= now then return 0 end
    local later = l - slot
    if later > 0 then
      req_cost = req_cost - later
      tok_cost = tok_cost - later
    end
    if req_cost <= 0 and tok_cost <= 0 then return 0 end
  end
  refund(req_cost, tok_cost, burst)
  store()
  return 0
elseif op == 'D' then
  -- debit: req_cost, tok_cost
  local req_cost, tok_cost = struct.unpack('<dd', arg, 2)
  if req_cost > 0 then
    if r < now then r = now end
    r = r + req_cost
  end
  if tok_cost > 0 then
    if t < now then t = now end
    t = t + tok_cost
  end
  store()
  return 0
elseif op == 'P' then
  -- pause: seconds, burst, jitter cap, requests limited (0/1), tokens limited (0/1)
  local seconds, burst, cap, has_req, has_tok = struct.unpack('<ddddd', arg, 2)
  local stop = now + seconds
  local resume = now
  if p > now then resume = p end
  local moved = 0
  if stop > resume then moved = stop - resume end
  if moved > 0 then
    s = s + moved
    p = stop
    j = cap
  end
  -- empty at `stop`, and whatever was already waiting moves back by the same amount, in order
  local horizon = stop + burst
  if has_req > 0 then
    r = r + moved
    if r < horizon then r = horizon end
  end
  if has_tok > 0 then
    t = t + moved
    if t < horizon then t = horizon end
  end
  store()
  return 0
elseif op == 'O' then
  -- observe: requests level, tokens level (seconds of refill; negative: unknown), burst
  local req_level, tok_level, burst = struct.unpack('<ddd', arg, 2)
  local wrote = false
  if req_level >= 0 and now + burst - req_level > r then
    r = now + burst - req_level
    wrote = true
  end
  if tok_level >= 0 and now + burst - tok_level > t then
    t = now + burst - tok_level
    wrote = true
  end
  if wrote then store() end
  return 0
end
return redis.error_reply('ragguard bucket: unknown operation ' .. op)
"""

_RESERVE = struct.Struct("<cddddddd")
_REFUND = struct.Struct("<cdddd")
_DEBIT = struct.Struct("<cdd")
_PAUSE = struct.Struct("<cddddd")
_OBSERVE = struct.Struct("<cddd")
_CHECK = b"C"
_WAIT_REPLY = struct.Struct("<ddddd")
_STATE_REPLY = struct.Struct("<dddddd")


class Reservation(NamedTuple):
    """The answer to :meth:`RedisBucketStore.reserve`.

    Attributes:
        admitted: ``True``: the reservation was made, sleep ``wait`` seconds then call; ``False``: refused because
            ``wait`` exceeds the budget, nothing reserved.
        wait: seconds from ``now`` until the call may go (``0.0``: at once).
        shift: the bucket's total pause shift when the reservation was made (see :meth:`RedisBucketStore.check`).
        now: the Redis server's time of the reservation, seconds since the epoch (``0.0`` when ``wait`` is 0).
        slot: the reservation's time less ``shift`` (server seconds; only when admitted with a wait, else
            :data:`NO_SLOT`): pass it to :meth:`RedisBucketStore.refund` to give this reservation back.
    """

    admitted: bool
    wait: float
    shift: float
    now: float
    slot: float = NO_SLOT


class BucketState(NamedTuple):
    """The bucket as :meth:`RedisBucketStore.check` sees it (server seconds since the epoch; ``-1e300``: never).

    Attributes:
        now: the server's time.
        shift: total seconds shared pauses have pushed the schedule back.
        paused_until: when the current (or last) shared pause ends.
        jitter_cap: the release jitter cap of that pause, seconds.
        req_tat, tok_tat: when the requests / tokens bucket is full again.
    """

    now: float
    shift: float
    paused_until: float
    jitter_cap: float
    req_tat: float
    tok_tat: float


#: a reservation that goes at once (the script's common answer: the integer 0)
GO = Reservation(True, 0.0, 0.0, 0.0)


class _Watchdog:
    """Bounds every store operation in flight on one event loop by the backend's timeout, with one timer for all.

    ``asyncio.timeout`` arms and cancels a timer per operation, about 5 µs; on a 100 µs round trip that is 5 % of
    the throughput. Here an operation only records its deadline; one timer, set for the earliest deadline,
    cancels the operations that outlive theirs, and the operation turns that cancellation into ``TimeoutError``
    exactly as ``asyncio.timeout`` does (``Task.uncancel``, so an outer cancellation still wins). Python 3.11+.
    """

    __slots__ = ("_at", "_deadlines", "_expired", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf

    async def run(self, awaitable: Awaitable[Any], seconds: float) -> Any:
        task: Any = asyncio.current_task()  # Any: Task.cancelling/uncancel are 3.11+, mypy checks for 3.10
        if task is None:  # pragma: no cover - not inside a task
            raise RuntimeError("a Redis operation must run inside an asyncio task")
        cancelling = task.cancelling()
        deadline = self._loop.time() + seconds
        self._deadlines[task] = deadline
        if deadline < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)
        try:
            result = await awaitable
        except BaseException as exc:
            # The operation may end otherwise than by our CancelledError (redis-py's own socket timeout turns it
            # into TimeoutError, or it had answered already): the cancel request we made is withdrawn all the
            # same, or the caller's task keeps it and its next cancel scope lets a bare CancelledError escape.
            if task in self._expired:
                self._expired.discard(task)
                if task.uncancel() <= cancelling and isinstance(exc, asyncio.CancelledError):
                    raise TimeoutError(f"no answer within {seconds} s") from None
            raise
        else:
            if task in self._expired:
                self._expired.discard(task)
                task.uncancel()
            return result
        finally:
            self._deadlines.pop(task, None)

    def _fire(self) -> None:
        self._handle = None
        self._at = math.inf
        now = self._loop.time()
        later = math.inf
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
            elif deadline < later:
                later = deadline
        if later != math.inf:
            self._at = later
            self._handle = self._loop.call_at(later, self._fire)


_HAS_UNCANCEL = sys.version_info >= (3, 11)


class RedisBucketStore:
    """Shared token buckets in Redis, one key per bucket name, one round trip per operation (see module doc).

    Made by :meth:`ragguard.RedisBackend.bucket_store` (one per backend); used by
    :class:`~ragguard.SharedRateLimiter`. Every cost, level and ``burst`` is in seconds of refill
    (``count · 60 / rate_per_minute``); every wait in seconds.

    Each operation runs the script by ``EVALSHA`` on the backend's client (reloading it on ``NOSCRIPT``) within
    the backend's ``timeout``, enforced by one timer per event loop for every operation in flight rather than a
    timer per operation (see ``_Watchdog``; on Python 3.10, ``anyio.fail_after``).

    Raises (every operation):
        BackendUnavailable: Redis did not answer within the backend's ``timeout``, or the connection failed.
    """

    __slots__ = ("_backend", "_bound", "_errors", "_keys", "_watchdogs")

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._keys: dict[str, str] = {}
        self._errors = _redis_errors()
        # (client, script, watchdog) of the client used last (one client per event loop; normally one loop)
        self._bound: tuple[Any, Any, _Watchdog | None] | None = None
        self._watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = weakref.WeakKeyDictionary()

    @property
    def backend(self) -> RedisBackend:
        return self._backend

    @property
    def on_unavailable(self) -> str:
        """The backend's ``on_unavailable`` (``fail_open`` or ``fail_closed``)."""
        return self._backend.options.on_unavailable

    @property
    def expected_instances(self) -> int:
        """The backend's ``expected_instances``."""
        return self._backend.options.expected_instances

    def key(self, name: str) -> str:
        """The Redis key of bucket ``name`` (namespaced, hash-tagged, the name hashed)."""
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = self._backend.key("bucket", name)
        return key

    async def _run(self, name: str, payload: bytes) -> Any:
        backend = self._backend
        key = self._keys.get(name) or self.key(name)
        try:
            client = backend.client()
            bound = self._bound
            if bound is None or bound[0] is not client:
                bound = self._bind(client)
            script = bound[1]
            watchdog = bound[2]
            if watchdog is not None:
                try:
                    return await watchdog.run(client.evalsha(script.sha, 1, key, payload), backend.options.timeout)
                except NoScriptError:
                    return await watchdog.run(
                        script(keys=[key], args=[payload], client=client), backend.options.timeout
                    )
            with anyio.fail_after(backend.options.timeout):  # pragma: no cover - Python 3.10
                try:
                    return await client.evalsha(script.sha, 1, key, payload)
                except NoScriptError:
                    return await script(keys=[key], args=[payload], client=client)
        except self._errors as exc:
            backend.last_error = exc
            raise BackendUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            if not unavailable_reply(exc):
                raise
            backend.last_error = exc
            raise BackendUnavailable(f"redis cannot keep state: {type(exc).__name__}: {exc}") from exc

    def _bind(self, client: Any) -> tuple[Any, Any, _Watchdog | None]:
        """The script object and watchdog for ``client`` (one client per event loop: normally one, ever)."""
        loop = asyncio.get_running_loop()
        watchdog = None
        if _HAS_UNCANCEL:
            watchdog = self._watchdogs.get(loop)
            if watchdog is None:
                watchdog = self._watchdogs[loop] = _Watchdog(loop)
        bound = (client, self._backend.script(BUCKET_SCRIPT), watchdog)
        self._bound = bound
        return bound

    async def reserve(
        self,
        name: str,
        req_cost: float,
        tok_cost: float,
        burst: float,
        budget: float,
        jitter: float,
        refund_req: float = 0.0,
        refund_tok: float = 0.0,
    ) -> Reservation:
        """Reserve ``req_cost`` and ``tok_cost`` (seconds of refill) if the wait is at most ``budget`` seconds.

        Args:
            name: the bucket.
            req_cost, tok_cost: the costs (``>= 0``); a cost above ``burst`` goes when the bucket is full.
            burst: the buckets' capacity, seconds of refill (``> 0``).
            budget: longest acceptable wait, seconds; a call that needs no wait is never refused.
            jitter: a uniform number in ``[0, 1)``: the share of the pause's jitter cap added to a release held
                only by a shared pause.
            refund_req, refund_tok: capacity to give back first, in the same round trip (a lease's unspent
                remainder).
        """
        if budget > _BIG:
            budget = _BIG
        reply = await self._run(
            name, _RESERVE.pack(b"R", req_cost, tok_cost, burst, budget, jitter, refund_req, refund_tok)
        )
        if reply == 0:
            return GO
        admitted, wait, shift, now, slot = _WAIT_REPLY.unpack(reply)
        return Reservation(admitted == 1.0, wait, shift, now, slot)

    async def check(self, name: str) -> BucketState:
        """Read the bucket's pause state and schedule (read-only)."""
        return BucketState(*_STATE_REPLY.unpack(await self._run(name, _CHECK)))

    async def refund(self, name: str, req_cost: float, tok_cost: float, burst: float, slot: float = NO_SLOT) -> None:
        """Give back capacity; the level never rises above capacity, nor above empty while a pause lasts.

        Args:
            slot: a cancelled reservation's :attr:`Reservation.slot`: only the part of its cost no later
                reservation depends on is given back, nothing once its time has come (see the module doc).
                Without it the whole amount comes off the end of the schedule: right for the newest reservation
                or tokens charged but not spent, not for an older reservation.
        """
        await self._run(name, _REFUND.pack(b"F", req_cost, tok_cost, burst, slot))

    async def debit(self, name: str, req_cost: float, tok_cost: float) -> None:
        """Charge extra cost now, without waiting (the level may go negative)."""
        await self._run(name, _DEBIT.pack(b"D", req_cost, tok_cost))

    async def pause(
        self, name: str, seconds: float, burst: float, jitter_cap: float, requests: bool, tokens: bool
    ) -> None:
        """Hold every caller of the bucket, in every instance, for ``seconds`` from the server's now.

        The buckets restart empty when the pause ends, reservations already made move back as a block, and
        callers released exactly at the end get up to ``jitter_cap`` seconds of upward jitter. A shorter pause
        inside a longer one changes nothing. ``requests`` / ``tokens``: whether that bucket is limited.

        Raises:
            ValueError: ``seconds`` negative, NaN or infinite.
        """
        if not (0.0 <= seconds < math.inf):
            raise ValueError(f"pause must be finite and >= 0 seconds, got {seconds!r}")
        await self._run(name, _PAUSE.pack(b"P", seconds, burst, jitter_cap, float(requests), float(tokens)))

    async def observe(self, name: str, req_level: float | None, tok_level: float | None, burst: float) -> None:
        """Lower the levels (seconds of refill left; ``None``: unknown) when lower than the bucket's; never
        raise them."""
        await self._run(
            name,
            _OBSERVE.pack(
                b"O",
                -1.0 if req_level is None else max(req_level, 0.0),
                -1.0 if tok_level is None else max(tok_level, 0.0),
                burst,
            ),
        )

    def __repr__(self) -> str:
        return f"RedisBucketStore({self._backend!r})"
