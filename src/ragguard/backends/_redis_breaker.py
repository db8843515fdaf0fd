"""Circuit-breaker state shared through Redis: one breaker per name seen by every instance of an app.

The state machine is the one of :class:`ragguard.CircuitBreaker` (resilience4j's count-based sliding window:
closed → open → half-open → closed), kept in Redis so that every process and machine of an app sees one breaker
per name (e.g. per provider, endpoint and model). Every operation is **one round trip**: a Lua script run by
``EVALSHA`` (reloaded on ``NOSCRIPT``), its keys passed as ``KEYS``, timed by the Redis server's clock (``TIME``),
so client clocks never matter.

Keys of one breaker (all share the hash tag of ``backend.key("breaker", name)``, hence one Redis Cluster slot):

- ``…:s`` — a hash: ``st`` (0 closed, 1 open, 2 half-open), ``gen`` (the generation, bumped by every
  transition; a result only counts in the generation that admitted its call), ``at`` (while open: the server
  time in milliseconds at which it admits probes, ``-1`` = until reset), ``fails`` / ``consec`` (failures in the
  window / in a row), ``succ`` (probe successes while half-open), ``seq`` (lease counter).
- ``…:w`` — a list, the sliding window of the last ``window`` outcomes (``1`` failure, ``0`` success), newest
  first: ``LPUSH`` then ``RPOP`` of what falls out, O(1) per call.
- ``…:p:1`` … ``…:p:N`` — the ``N = half_open_probes`` probe leases. A probe is granted by setting a free slot
  with ``SET … NX PX half_open_max_wait``, so a probe that never reports frees its place on its own; its value
  is a token unique to that grant, and a report whose token no longer holds the slot (expired, or the breaker
  moved on) is ignored. With ``half_open_probes=1`` exactly one instance at a time sends the probe.

Keys expire when idle: every write sets their TTL to ``idle_ttl`` seconds (plus the time left while open);
an idle breaker's keys vanish and it starts again closed with an empty window. A breaker opened by
``force_open(duration=None)`` does not expire until it is reset.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..config import BreakerPolicy

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["BreakerReply", "RedisBreakerStore"]

StateName = Literal["closed", "open", "half_open"]

_STATES: tuple[StateName, StateName, StateName] = ("closed", "open", "half_open")

# --- Lua (Redis 6.2: Lua 5.1; ``replicate_commands`` before writing after TIME) ------------------------------
#
# KEYS[1] the state hash, KEYS[2] the window list, KEYS[3..] the probe slots (as many as half_open_probes).
# ARGV[1] the idle TTL in milliseconds; the rest depends on the script.
# Every script returns {st, gen, retry_ms, calls, fails, consec, probes, admitted, lease}: retry_ms is -1 when
# there is nothing to wait for, -2 when open until reset; gen is a decimal string.

_PRELUDE = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[1])
local nslots = #KEYS - 2

local function fmt(x)
  return string.format('%.0f', x)
end

local function load()
  local h = redis.call('HMGET', KEYS[1], 'st', 'gen', 'at', 'fails', 'consec', 'succ')
  if not h[1] then
    return {st = 0, gen = now, at = -1, fails = 0, consec = 0, succ = 0, fresh = true}
  end
  return {
    st = tonumber(h[1]), gen = tonumber(h[2]) or now, at = tonumber(h[3]) or -1,
    fails = tonumber(h[4]) or 0, consec = tonumber(h[5]) or 0, succ = tonumber(h[6]) or 0, fresh = false,
  }
end

local function save(s)
  redis.call('HSET', KEYS[1], 'st', s.st, 'gen', fmt(s.gen), 'at', fmt(s.at),
    'fails', s.fails, 'consec', s.consec, 'succ', s.succ)
  if s.st == 1 and s.at < 0 then
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[2])
  else
    local ttl = idle
    if s.st == 1 then
      ttl = ttl + math.max(0, s.at - now)
    end
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end

local function transition(s, st, at)
  s.gen = s.gen + 1
  s.st = st
  s.at = at
  s.succ = 0
  if nslots > 0 then
    redis.call('DEL', unpack(KEYS, 3))
  end
  if st == 0 then
    s.fails = 0
    s.consec = 0
    redis.call('DEL', KEYS[2])
  end
end

local function retry_ms(s)
  if s.st ~= 1 then
    return -1
  end
  if s.at < 0 then
    return -2
  end
  return math.max(0, s.at - now)
end

local function reply(s, retry, probes, admitted, lease)
  local calls = redis.call('LLEN', KEYS[2])
  return {s.st, fmt(s.gen), retry, calls, s.fails, s.consec, probes, admitted, lease}
end
"""

# ARGV[2] half_open_max_wait in milliseconds.
_PERMIT = (
    _PRELUDE
    + """
local s = load()
if s.st == 0 then
  if s.fresh then
    save(s)
  end
  return reply(s, -1, 0, 1, '')
end
local changed = false
if s.st == 1 then
  if s.at < 0 or now < s.at then
    return reply(s, retry_ms(s), 0, 0, '')
  end
  transition(s, 2, -1)
  changed = true
end
local held, free, soonest = 0, nil, nil
for i = 3, #KEYS do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl == -2 then
    if not free then
      free = i
    end
  else
    held = held + 1
    if ttl >= 0 and (not soonest or ttl < soonest) then
      soonest = ttl
    end
  end
end
if free and s.succ + held < nslots then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local lease = (free - 2) .. ':' .. fmt(s.gen) .. ':' .. seq
  if redis.call('SET', KEYS[free], lease, 'NX', 'PX', ARGV[2]) then
    save(s)
    return reply(s, -1, held + 1, 1, lease)
  end
end
if changed then
  save(s)
end
return reply(s, soonest or tonumber(ARGV[2]), held, 0, '')
"""
)

# ARGV[2] verdict (0 success, 1 failure, 2 none: only frees a probe lease), ARGV[3] the generation of the permit,
# ARGV[4] its lease ('' when not a probe), ARGV[5] failure_threshold, ARGV[6] failure_rate, ARGV[7] window,
# ARGV[8] min_calls, ARGV[9] open_duration in milliseconds.
_RECORD = (
    _PRELUDE
    + """
local s = load()
local verdict = tonumber(ARGV[2])
if s.fresh or fmt(s.gen) ~= ARGV[3] then
  return reply(s, retry_ms(s), 0, 0, '')
end
if s.st == 0 then
  if verdict == 2 then
    return reply(s, -1, 0, 0, '')
  end
  local window = tonumber(ARGV[7])
  local calls = redis.call('LPUSH', KEYS[2], verdict)
  s.fails = s.fails + verdict
  while calls > window do
    local old = redis.call('RPOP', KEYS[2])
    if not old then
      break
    end
    s.fails = s.fails - tonumber(old)
    calls = calls - 1
  end
  s.fails = math.max(0, math.min(s.fails, calls))
  if verdict == 1 then
    s.consec = s.consec + 1
  else
    s.consec = 0
  end
  if s.consec >= tonumber(ARGV[5])
    or (calls >= tonumber(ARGV[8]) and s.fails / calls >= tonumber(ARGV[6])) then
    transition(s, 1, now + tonumber(ARGV[9]))
  end
  save(s)
  return reply(s, retry_ms(s), 0, 1, '')
end
if s.st ~= 2 or ARGV[4] == '' then
  return reply(s, retry_ms(s), 0, 0, '')
end
local slot = tonumber(string.match(ARGV[4], '^(%d+):'))
if not slot or slot < 1 or slot > nslots or redis.call('GET', KEYS[slot + 2]) ~= ARGV[4] then
  return reply(s, retry_ms(s), 0, 0, '')
end
redis.call('DEL', KEYS[slot + 2])
if verdict == 1 then
  transition(s, 1, now + tonumber(ARGV[9]))
elseif verdict == 0 then
  s.succ = s.succ + 1
  if s.succ >= nslots then
    transition(s, 0, -1)
  end
end
save(s)
return reply(s, retry_ms(s), 0, 1, '')
"""
)

# ARGV[2] the duration in milliseconds, -1 = until reset.
_FORCE_OPEN = (
    _PRELUDE
    + """
local s = load()
local duration = tonumber(ARGV[2])
if duration < 0 then
  transition(s, 1, -1)
else
  transition(s, 1, now + duration)
end
save(s)
return reply(s, retry_ms(s), 0, 1, '')
"""
)

_RESET = (
    _PRELUDE
    + """
local s = load()
transition(s, 0, -1)
save(s)
return reply(s, -1, 0, 1, '')
"""
)

# Read-only: an open breaker whose time is up is reported half-open (the next permit makes it so).
_SNAPSHOT = (
    _PRELUDE
    + """
local s = load()
local probes = 0
if s.st == 1 and s.at >= 0 and now >= s.at then
  s.st = 2
elseif s.st == 2 then
  for i = 3, #KEYS do
    probes = probes + redis.call('EXISTS', KEYS[i])
  end
end
return reply(s, retry_ms(s), probes, 1, '')
"""
)


@dataclass(frozen=True, slots=True)
class BreakerReply:
    """The shared state of one breaker as a store operation left it.

    Attributes:
        state: ``"closed"``, ``"open"`` or ``"half_open"``.
        generation: bumped by every transition; pass the one of a permit back to :meth:`RedisBreakerStore.record`.
        admitted: for :meth:`~RedisBreakerStore.permit`, whether the call may go; for
            :meth:`~RedisBreakerStore.record`, whether its result counted (``False``: ignored, being stale);
            ``True`` otherwise.
        lease: the probe lease of an admitted half-open call (an opaque token), else ``None``.
        retry_after: seconds until the breaker admits a call again: while open, until its probe
            (``math.inf`` when forced open until reset); half-open with every probe place taken, until the
            soonest lease expires; else ``None``.
        calls: outcomes in the sliding window (``<= window``).
        failures: failures among them.
        consecutive_failures: failures in a row since the last success.
        probes: probe leases held (reported by :meth:`~RedisBreakerStore.snapshot` and by a half-open
            :meth:`~RedisBreakerStore.permit`; ``0`` elsewhere).
    """

    state: StateName
    generation: int
    admitted: bool
    lease: str | None
    retry_after: float | None
    calls: int
    failures: int
    consecutive_failures: int
    probes: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(raw: Any) -> BreakerReply:
    st, gen, retry_ms, calls, fails, consec, probes, admitted, lease = raw
    retry = int(retry_ms)
    lease_text = _text(lease)
    return BreakerReply(
        state=_STATES[int(st)],
        generation=int(_text(gen)),
        admitted=bool(int(admitted)),
        lease=lease_text or None,
        retry_after=None if retry == -1 else math.inf if retry == -2 else retry / 1000.0,
        calls=int(calls),
        failures=int(fails),
        consecutive_failures=int(consec),
        probes=int(probes),
    )


def _ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (``PX`` and the scripts' arithmetic work in milliseconds)."""
    return max(1, math.ceil(seconds * 1000.0))


class RedisBreakerStore:
    """Circuit-breaker state in Redis, shared by every instance that uses the same breaker name.

    Made by :meth:`ragguard.RedisBackend.breaker_store` (one per backend); used by
    :class:`ragguard.SharedCircuitBreaker`. Each method is one round trip (a Lua script on the server's clock)
    and takes the breaker's :class:`~ragguard.BreakerPolicy`: the rules travel with each call, so instances
    sharing a name should share a policy (the window, thresholds and durations of the caller apply to its own
    operation; ``half_open_probes`` sets the number of probe slots and must agree across instances).

    Args:
        backend: the :class:`~ragguard.RedisBackend` (connection, key names, timeout).
        idle_ttl: seconds after its last write at which an idle breaker's keys expire (never below
            ``half_open_max_wait``; while open the time left is added).

    Every method raises :class:`~ragguard.BackendUnavailable` (the cause chained) when Redis does not answer
    within ``backend.options.timeout`` seconds.
    """

    __slots__ = ("_keys", "_lock", "backend", "idle_ttl")

    def __init__(self, backend: RedisBackend, *, idle_ttl: float = 3600.0) -> None:
        if not idle_ttl > 0:
            raise ValueError(f"idle_ttl must be > 0 seconds, got {idle_ttl}")
        self.backend = backend
        self.idle_ttl = idle_ttl
        self._keys: dict[tuple[str, int], list[str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisBreakerStore({self.backend!r})"

    @property
    def on_unavailable(self) -> Literal["fail_open", "fail_closed"]:
        """The backend's choice when Redis cannot answer (``fail_open`` or ``fail_closed``)."""
        return self.backend.options.on_unavailable

    def keys(self, name: str, policy: BreakerPolicy) -> list[str]:
        """The Redis keys of breaker ``name``: state hash, window list, then one per probe slot (one slot)."""
        slots = policy.half_open_probes
        found = self._keys.get((name, slots))
        if found is None:
            key = self.backend.key
            found = [key("breaker", name, "s"), key("breaker", name, "w")]
            found += [key("breaker", name, "p", str(i)) for i in range(1, slots + 1)]
            with self._lock:
                if len(self._keys) > 4096:  # bounded: names are few; never grow without end
                    self._keys.clear()
                self._keys[(name, slots)] = found
        return found

    def _idle_ms(self, policy: BreakerPolicy) -> int:
        return _ms(max(self.idle_ttl, policy.half_open_max_wait))

    async def _run(self, source: str, name: str, policy: BreakerPolicy, args: list[Any]) -> BreakerReply:
        keys = self.keys(name, policy)
        argv = [self._idle_ms(policy), *args]
        backend = self.backend
        raw = await backend.execute(lambda client: backend.script(source)(keys=keys, args=argv, client=client))
        return _parse(raw)

    async def permit(self, name: str, policy: BreakerPolicy) -> BreakerReply:
        """Ask to make one call: ``admitted`` closed (no lease), admitted as the half-open probe (``lease`` set,
        expiring after ``half_open_max_wait`` seconds), or refused with ``retry_after`` seconds to wait.

        An open breaker whose ``open_duration`` is up turns half-open here (a new generation)."""
        return await self._run(_PERMIT, name, policy, [_ms(policy.half_open_max_wait)])

    async def record(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        generation: int,
        success: bool | None,
        lease: str | None = None,
    ) -> BreakerReply:
        """Report the result of a call admitted by :meth:`permit` with ``generation`` (and ``lease``, for a probe).

        ``success`` ``True``/``False`` enters the window (closed) or settles the probe (half-open: a success
        closes the breaker once ``half_open_probes`` succeeded, a failure opens it again for ``open_duration``);
        ``None`` only frees a probe lease. A result from an earlier generation, or of a lease that expired, is
        ignored (``admitted`` is ``False`` in the reply). Closed → open when ``failure_threshold`` failures came
        in a row or, with at least ``min_calls`` in the window, the failure share reached ``failure_rate``.
        """
        verdict = 2 if success is None else 0 if success else 1
        args = [
            verdict,
            str(generation),
            lease or "",
            policy.failure_threshold,
            repr(float(policy.failure_rate)),
            policy.window,
            policy.min_calls,
            _ms(policy.open_duration),
        ]
        return await self._run(_RECORD, name, policy, args)

    async def force_open(self, name: str, policy: BreakerPolicy, duration: float | None = None) -> BreakerReply:
        """Open the breaker for every instance, for ``duration`` seconds (``None``: until :meth:`reset`)."""
        if duration is not None and not duration >= 0:
            raise ValueError(f"duration must be >= 0 seconds, got {duration}")
        ms = -1 if duration is None or math.isinf(duration) else max(0, math.ceil(duration * 1000.0))
        return await self._run(_FORCE_OPEN, name, policy, [ms])

    async def reset(self, name: str, policy: BreakerPolicy) -> BreakerReply:
        """Close the breaker for every instance, with an empty window; results of calls in flight are ignored."""
        return await self._run(_RESET, name, policy, [])

    async def snapshot(self, name: str, policy: BreakerPolicy) -> BreakerReply:
        """The shared state, read without changing it (an open breaker whose time is up reads ``half_open``)."""
        return await self._run(_SNAPSHOT, name, policy, [])
