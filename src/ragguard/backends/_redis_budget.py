"""Retry budgets shared through Redis: one sliding window of requests and retries per budget name.

The window is the one of :class:`ragguard.RetryBudget` (after Finagle's ``RetryBudget`` and Envoy's retry
budgets): ``window_s`` seconds cut into ``buckets`` equal buckets, the current bucket and the ``buckets - 1``
before it counting, and a retry allowed while ::

    retries (this one included)  <=  ratio × requests  +  floor        (floor = min_retries_per_s × window_s)

It lives in Redis so that every process of an app spends one budget. Every operation is **one round trip**: a Lua
script run by ``EVALSHA`` (reloaded on ``NOSCRIPT``), its key passed as ``KEYS[1]``, timed by the Redis server's
clock (``TIME``), so client clocks never matter.

One key per budget (a hash, hash-tagged by :meth:`~ragguard.RedisBackend.key`, so one Redis Cluster slot), named
after the budget *and* its window geometry (budgets whose ``window_s`` or ``buckets`` differ never share a ring):

- ``h``: the absolute index (``floor(server time / bucket width)``) of the newest bucket;
- ``q`` / ``r``: the requests / retries of the whole window (kept as running sums, so a check is O(1));
- ``q<slot>`` / ``r<slot>``: the requests / retries of the bucket in ring slot ``slot`` (absent when zero).

Moving to a newer bucket subtracts and deletes the slots that fell out of the window (at most ``buckets`` per
operation, so O(1) amortised); a gap of a whole window deletes the key. Every write sets the key to expire
``window_s`` seconds (plus a margin) later: an idle budget's key vanishes, which means exactly what its expired
buckets did. ``ratio`` and ``floor`` travel with each call (the caller's rule, applied to the shared counts).

Errors: every operation raises :class:`~ragguard.BackendUnavailable` when Redis cannot answer within the
backend's ``timeout`` (the cause chained), as :meth:`~ragguard.RedisBackend.execute` does.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["BUDGET_SCRIPT", "BudgetReply", "RedisBudgetStore"]

#: the key outlives its newest write by the window plus this margin, seconds
_EXPIRY_MARGIN = 1.0

# Redis 6.2: Lua 5.1; ``replicate_commands`` before writing after TIME.
BUDGET_SCRIPT = """
-- ragguard shared retry budget, see ragguard/backends/_redis_budget.py.
-- KEYS[1]: the budget hash (h, q, r, q<slot>, r<slot>).
-- ARGV: op ('D' deposit, 'A' acquire a retry, 'S' snapshot), bucket width in microseconds, buckets,
--       requests to deposit first, ratio, floor (retries per window), TTL in milliseconds.
-- Returns {granted (0/1), requests in the window, retries in the window}.
redis.replicate_commands()
local key = KEYS[1]
local op = ARGV[1]
local width = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local add = tonumber(ARGV[4])
local t = redis.call('TIME')
-- microseconds since the epoch (~1.8e15) are exact in a double
local index = math.floor((tonumber(t[1]) * 1000000 + tonumber(t[2])) / width)
local h = redis.call('HMGET', key, 'h', 'q', 'r')
local head = tonumber(h[1])
local q = tonumber(h[2]) or 0
local r = tonumber(h[3]) or 0
local dirty = false
if not head then
  if add == 0 and op ~= 'A' then
    return {0, 0, 0}
  end
  head = index
  q = 0
  r = 0
  dirty = true
elseif index > head then
  if index - head >= n then
    -- the whole window expired
    redis.call('DEL', key)
    q = 0
    r = 0
  else
    for a = head + 1, index do
      local slot = a % n
      local old = redis.call('HMGET', key, 'q' .. slot, 'r' .. slot)
      if old[1] or old[2] then
        q = q - (tonumber(old[1]) or 0)
        r = r - (tonumber(old[2]) or 0)
        redis.call('HDEL', key, 'q' .. slot, 'r' .. slot)
      end
    end
  end
  head = index
  dirty = true
end
-- an index below head (a TIME read just before another script's) counts in the newest bucket, as locally
local slot = head % n
if add > 0 then
  redis.call('HINCRBY', key, 'q' .. slot, add)
  q = q + add
  dirty = true
end
local granted = 0
if op == 'A' then
  if r + 1 <= tonumber(ARGV[5]) * q + tonumber(ARGV[6]) + 1e-9 then
    redis.call('HINCRBY', key, 'r' .. slot, 1)
    r = r + 1
    granted = 1
    dirty = true
  end
elseif op ~= 'D' and op ~= 'S' then
  return redis.error_reply('ragguard budget: unknown operation ' .. op)
end
if dirty then
  redis.call('HSET', key, 'h', string.format('%.0f', head), 'q', q, 'r', r)
  redis.call('PEXPIRE', key, ARGV[7])
end
return {granted, q, r}
"""


class BudgetReply(NamedTuple):
    """The shared window of one budget as a store operation left it.

    Attributes:
        granted: for :meth:`RedisBudgetStore.acquire`, whether the retry was granted (and recorded); else ``False``.
        window_requests: requests in the window.
        window_retries: retries in the window.
    """

    granted: bool
    window_requests: int
    window_retries: int


class RedisBudgetStore:
    """Retry-budget windows in Redis, shared by every instance using the same budget name and window.

    Made by :meth:`ragguard.RedisBackend.budget_store` (one per backend); used by
    :class:`ragguard.SharedRetryBudget`. Each method is one round trip (a Lua script on the server's clock).

    Args:
        backend: the :class:`~ragguard.RedisBackend` (connection, key names, timeout).

    Every method raises :class:`~ragguard.BackendUnavailable` (the cause chained) when Redis does not answer
    within ``backend.options.timeout`` seconds, and ``ValueError`` for a negative count or a window that is not
    a positive number of seconds.
    """

    __slots__ = ("_keys", "_lock", "backend")

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self._keys: dict[tuple[str, float, int], str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisBudgetStore({self.backend!r})"

    @property
    def on_unavailable(self) -> Literal["fail_open", "fail_closed"]:
        """The backend's choice when Redis cannot answer (``fail_open`` or ``fail_closed``)."""
        return self.backend.options.on_unavailable

    @property
    def expected_instances(self) -> int:
        """The backend's ``expected_instances``."""
        return self.backend.options.expected_instances

    def key(self, name: str, window_s: float, buckets: int) -> str:
        """The Redis key of budget ``name`` with this window (namespaced, hash-tagged, the name hashed)."""
        found = self._keys.get((name, window_s, buckets))
        if found is None:
            found = self.backend.key("budget", f"{name}\x00{window_s!r}\x00{buckets}")
            with self._lock:
                if len(self._keys) > 4096:  # bounded: names are few; never grow without end
                    self._keys.clear()
                self._keys[(name, window_s, buckets)] = found
        return found

    async def _run(
        self, op: str, name: str, window_s: float, buckets: int, add: int, ratio: float, floor: float
    ) -> BudgetReply:
        if not (0.0 < window_s < math.inf) or buckets < 1:
            raise ValueError(f"a window of {window_s!r} s in {buckets!r} buckets is not valid")
        if add < 0:
            raise ValueError(f"requests: expected >= 0, got {add!r}")
        keys = [self.key(name, window_s, buckets)]
        width_us = window_s * 1_000_000.0 / buckets
        ttl_ms = math.ceil((window_s + _EXPIRY_MARGIN) * 1000.0)
        argv: list[Any] = [op, repr(width_us), buckets, add, repr(float(ratio)), repr(float(floor)), ttl_ms]
        backend = self.backend
        raw = await backend.execute(lambda client: backend.script(BUDGET_SCRIPT)(keys=keys, args=argv, client=client))
        granted, requests, retries = raw
        return BudgetReply(bool(int(granted)), int(requests), int(retries))

    async def deposit(self, name: str, requests: int, *, window_s: float, buckets: int) -> BudgetReply:
        """Add ``requests`` first attempts to the current bucket of budget ``name``; the window after it."""
        return await self._run("D", name, window_s, buckets, requests, 0.0, 0.0)

    async def acquire(
        self, name: str, *, deposit: int, ratio: float, floor: float, window_s: float, buckets: int
    ) -> BudgetReply:
        """Add ``deposit`` first attempts, then grant one retry (recording it) if ``retries + 1 <= ratio ×
        requests + floor`` over the window, all in one atomic step. ``floor`` is in retries per window."""
        return await self._run("A", name, window_s, buckets, deposit, ratio, floor)

    async def snapshot(self, name: str, *, window_s: float, buckets: int) -> BudgetReply:
        """The window's counts (expiring the buckets that fell out of it first)."""
        return await self._run("S", name, window_s, buckets, 0, 0.0, 0.0)
