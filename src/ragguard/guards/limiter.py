"""The local (in-process) rate limiter: a requests-per-minute and a tokens-per-minute bucket that *wait*.

Model
-----
Each bucket is a token bucket that refills continuously at ``rate/60`` per second up to a capacity of
``rate/60 · burst_seconds`` (OpenAI's published limits are per minute but enforced over shorter periods).
A call costs ``requests`` against the requests bucket and ``tokens`` against the tokens bucket.

The buckets are kept as a *reservation schedule*, the virtual-scheduling form of the Generic Cell Rate
Algorithm (ITU-T I.371's GCRA; the same idea as Go's ``golang.org/x/time/rate`` ``Reserve``): per bucket one
float, the *theoretical arrival time* ``tat`` at which the bucket would be full again. Acquiring computes,
in O(1) under a short lock, the earliest time ``at`` at which every bucket holds the call's cost, charges the
cost at ``at`` (so the level may go negative: debt promised to earlier callers) and tells the caller to sleep
until ``at``. There is no waiter queue and no event-loop-bound object (aiolimiter#292); calls are admitted in
the order they reserved (FIFO by construction), and over any window of ``t`` seconds a bucket admits at most
``capacity + rate·t`` (plus, see below, one oversize cost).

- A cost larger than a bucket's capacity is admitted when the bucket is full, taking the level into debt,
  rather than never: a 30,000-token request under a 20,000-token burst waits for a full bucket, goes, and
  later callers wait for the debt to clear. The window bound becomes ``max(capacity, largest cost) + rate·t``.
- A call whose wait would exceed ``min(max_wait, time left before its deadline)`` is refused at once with
  :class:`~ragguard.RateLimitTimeout`, consuming nothing (limits#221: we wait, but never pointlessly). A call
  that needs no wait is never refused.
- A caller cancelled while waiting gives its reservation back (the level is capped at capacity), but only the
  part no later reservation depends on, as Go's ``golang.org/x/time/rate`` ``Reservation.CancelAt`` does: it
  gives back ``max(0, cost - (latest - at))`` seconds of refill, where ``at`` is its own time and ``latest`` the
  latest time of any reservation made with a wait (both counted before shared pauses, which move the whole
  schedule), and nothing once its time has come. The callers scheduled after it keep their times, so a
  newcomer never takes the same slot as one of them and the window bound holds; the newest waiter gives back
  its whole cost. (Measuring the later reservations by how far they pushed ``tat`` instead would give back
  too much when one of them was charged from its own time, as happens when the other bucket delays it, or
  after an oversize cost.) After a slower rate (below), the schedule was stretched under the waiters, so a
  waiter reserved before it gives nothing back.

Accounting (after a successful call; ``ctx.used_tokens`` comes from the provider's ``usage``)
---------------------------------------------------------------------------------------------
- ``openai``: OpenAI counts the prompt estimate plus ``max_tokens × n`` at admission and never refunds unused
  tokens (https://platform.openai.com/docs/guides/rate-limits), so the limiter only debits the difference when
  the real usage exceeds what it charged.
- ``reconcile``: the tokens bucket is settled to the real usage both ways (debit or refund).
- Failed calls keep their charge: providers count failed requests too.

Provider feedback
-----------------
- ``follow_headers``: after a call (success or failure), when the provider's ``x-ratelimit-remaining-*`` says
  fewer requests or tokens are left than the limiter's level, the level is lowered to match. It is never
  raised: the provider is the ground truth when it says less is left.
- ``follow_headers`` also makes the *refill rate* adapt, never above the configured ``rpm`` / ``tpm``::

      effective rate = min(configured, advertised) · backoff

  *advertised* is the provider's own limit, ``x-ratelimit-limit-requests`` / ``x-ratelimit-limit-tokens`` (per
  minute: "the maximum number of requests / tokens that are permitted before exhausting the rate limit",
  https://platform.openai.com/docs/guides/rate-limits, section "Rate limits in headers"; OpenAI refills a
  bucket continuously, ``x-ratelimit-reset-*`` being the time until it is full again, e.g. ``6m0s``,
  ``120ms``, which the 429 wait hint reads). It is learnt from the latest response, and only with
  ``scope="model"`` (OpenAI's limits are per model; a ``credential`` pool spans models with different limits).
  A provider that puts another figure under these names (Groq's ``x-ratelimit-limit-requests`` counts requests
  per *day*) advertises more than any per-minute quota, which the ``min`` then keeps.
  *backoff* is AIMD over the rate (Chiu & Jain, 1989): a 429 that carries the provider's ``x-ratelimit-*``
  headers (a bare 429 only pauses, see below) multiplies it by :data:`RATE_BACKOFF` (0.7, TCP
  CUBIC's β, RFC 9438 §4.6), once per round — only a call admitted since the last decrease (or since a lower
  advertised limit was learnt) decreases it again, so a burst of 429s answering one over-fast round counts once;
  it never falls below :data:`MIN_RATE_BACKOFF`. While below 1 it recovers additively, by
  :data:`RATE_RECOVERY_PER_S` (0.02, i.e. 2 % of the rate per second: 15 s from 0.7 back to 1), at each
  successful call. A slower rate keeps each bucket's level (its count of requests or tokens, debt included) and
  converts it to the new refill speed, and the reservations already waiting are stretched the same way
  (``t → b + (t - b)·k``, ``k`` = new interval / old, ``b`` = now or the end of a pause), so callers scheduled
  at a too-high rate before the provider's limit was known go at the new pace too. When the slower rate is a
  newly learnt advertised limit (a fact about the past too, not only a decision for the future), the calls
  admitted during the last ``burst_seconds`` of the bucket's busy period are moreover charged as if that rate
  had applied to them (the over-admitted burst becomes debt that later callers wait out): the first callers of
  a process, admitted at a too-high configured rate before any answer came back, are still on their way to the
  provider and would otherwise meet an empty provider bucket. A faster rate (recovery, a
  higher advertised limit) only makes refill faster from then on: the debt and the waiting reservations keep
  their times. Since the effective rate never exceeds the configured one, the window bound below holds for the
  configured quota whatever the provider says.
- ``share_retry_after``: when an attempt fails rate-limited (``ctx.classify(exc).rate_limited``), the whole
  limiter pauses for the provider's hint (``retry-after-ms`` / ``Retry-After``; without one, the time one
  request takes to refill). Every caller of the limiter holds off, not only the one that got the 429
  (hermes-agent#109234). The exception still propagates; the retry guard decides whether to retry.

Shared-pause guarantee: after a pause that ends at ``P`` no call is admitted before ``P``; the buckets restart
empty at ``P`` (a 429 says the provider's bucket is empty); reservations already waiting are pushed back as a
block, keeping their order and their spacing by the refill rate; callers that would otherwise all be released
exactly at ``P`` are spread by an upward-only jitter of ``uniform(0, min(0.1·pause, 3 request intervals))`` so
they do not re-trip the limit together. A limiter with neither ``rpm`` nor ``tpm`` still honours pauses.

Thread-safety: every state change happens under a :class:`threading.Lock` held only for a few float
operations, never across an ``await``, so callers on other threads (and other event loops) may share one
limiter.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal, TypeVar

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._hints import MAX_HINT_SECONDS, RateLimitHeaders
from ..config import RateLimitPolicy
from ..errors import RateLimitTimeout
from .pipeline import GuardBase

__all__ = ["RateLimiter"]

T = TypeVar("T")

#: pause after a rate-limited failure without a wait hint, seconds, when there is neither ``rpm`` nor ``tpm``
DEFAULT_PAUSE = 1.0
#: release jitter after a shared pause: at most this fraction of the pause ...
PAUSE_JITTER_FRACTION = 0.1
#: ... and at most this many request intervals (``60/rpm`` seconds each) when there is a request limit
PAUSE_JITTER_INTERVALS = 3.0
#: multiplicative decrease of the effective rate on a 429 (``follow_headers``), once per round
RATE_BACKOFF = 0.7
#: the effective rate never falls below this share of ``min(configured, advertised)``
MIN_RATE_BACKOFF = 0.05
#: additive recovery of the backoff factor, per second, applied at each success while it is below 1
RATE_RECOVERY_PER_S = 0.02

_INF = math.inf


class _Reservation:
    """A reservation that must wait (what ``_reserve`` returns when the call cannot go at once).

    Attributes:
        wait: seconds from the reservation until the call may go.
        at: the call's time, in the frame of ``shift0`` (a slower rate moves it, see ``_retune``).
        shift0: the limiter's total pause shift when the reservation was made.
        epoch: the limiter's rate round then (a slower rate starts a new one).
        req_cost, tok_cost: what it charged, seconds of refill.
    """

    __slots__ = ("at", "epoch", "req_cost", "shift0", "tok_cost", "wait")

    def __init__(self, wait: float, at: float, shift0: float, epoch: int, req_cost: float, tok_cost: float) -> None:
        self.wait = wait
        self.at = at
        self.shift0 = shift0
        self.epoch = epoch
        self.req_cost = req_cost
        self.tok_cost = tok_cost


def _rescaled(tat: float, old_inv: float, new_inv: float, base: float, burst: float) -> float:
    """A bucket's ``tat`` after its cost per unit changes from ``old_inv`` to ``new_inv`` seconds, keeping its
    level in units (debt included): level ``L`` at time ``base`` is ``tat = base + burst - L·inv``."""
    behind = tat - base
    if behind <= 0.0:
        return tat  # full: stays full
    return base + burst - (burst - behind) / old_inv * new_inv


class RateLimiter(GuardBase):
    """Requests-per-minute and tokens-per-minute limits that make callers wait their turn (see module doc).

    Args:
        rpm: requests per minute (``None``: no request limit).
        tpm: tokens per minute (``None``: no token limit).
        burst_seconds: bucket capacity in seconds of refill (capacity = ``rate/60 · burst_seconds``).
        scope: which callers share one limiter (``model`` or ``credential``); decided by the provider layer,
            stored here for it.
        accounting: ``openai`` (debit under-estimates only) or ``reconcile`` (settle to ``usage`` both ways).
        follow_headers: lower the levels to the provider's ``x-ratelimit-remaining-*`` when they are lower, cap
            the rates to its ``x-ratelimit-limit-*`` and back off on 429s (see the module docstring).
        share_retry_after: pause every caller when an attempt is rate-limited.
        max_wait: longest wait for capacity, seconds (``None``: until the call's deadline).
        clock: the clock the schedule runs on (waits use ``clock.sleep``).
        name: a label for errors and health reports.
        rng: the random source of the release jitter (seed one for reproducible tests).

    Raises:
        pydantic.ValidationError: an invalid setting, naming the field (``rpm=-1``, ``burst_seconds=0``…).

    Example::

        limiter = RateLimiter(rpm=3_000, tpm=250_000)
        ctx = CallContext(tokens=1_200)
        reply = await limiter.run(lambda: client.chat.completions.create(...), ctx)
    """

    stage: ClassVar[str] = "rate_limit"
    #: every wait of this guard ends by ``ctx.deadline`` (lets Pipeline elide a redundant cancel scope)
    honours_deadline = True
    __slots__ = (
        "_adv_req_inv",
        "_adv_tok_inv",
        "_backoff",
        "_backoff_at",
        "_burst",
        "_cfg_req_inv",
        "_cfg_tok_inv",
        "_epoch",
        "_follow_headers",
        "_jitter_cap",
        "_last_slot",
        "_learn_limits",
        "_lock",
        "_max_wait",
        "_paused_until",
        "_reconcile",
        "_req_busy",
        "_req_inv",
        "_req_tat",
        "_rng",
        "_share_retry_after",
        "_shift",
        "_sleepers",
        "_tok_busy",
        "_tok_inv",
        "_tok_tat",
        "clock",
        "name",
        "policy",
    )

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_seconds: float = 0.5,
        scope: Literal["model", "credential"] = "model",
        accounting: Literal["openai", "reconcile"] = "openai",
        follow_headers: bool = True,
        share_retry_after: bool = True,
        max_wait: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "default",
        rng: random.Random | None = None,
    ) -> None:
        self.policy = RateLimitPolicy(
            rpm=rpm,
            tpm=tpm,
            burst_seconds=burst_seconds,
            scope=scope,
            accounting=accounting,
            follow_headers=follow_headers,
            share_retry_after=share_retry_after,
            max_wait=max_wait,
        )
        policy = self.policy
        self.clock = clock
        self.name = name
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not a secret
        self._lock = threading.Lock()
        self._burst = float(policy.burst_seconds)
        # Seconds of refill one unit costs (0.0: no limit). Every bucket quantity below is kept in seconds of
        # refill, so capacity is ``burst`` for both buckets and the arithmetic is the same.
        self._req_inv = 60.0 / policy.rpm if policy.rpm is not None else 0.0
        self._tok_inv = 60.0 / policy.tpm if policy.tpm is not None else 0.0
        # theoretical arrival times: when each bucket would be full again (-inf: full since forever)
        self._req_tat = -math.inf
        self._tok_tat = -math.inf
        # when each bucket was last full (the start of its busy period): a learnt limit replays from there
        self._req_busy = -math.inf
        self._tok_busy = -math.inf
        self._max_wait = policy.max_wait if policy.max_wait is not None else math.inf
        self._paused_until = -math.inf
        # total seconds shared pauses have pushed the schedule back; a waiting caller compares it with the
        # value it saw when it reserved to learn how far its own reservation moved
        self._shift = 0.0
        # the latest time of a reservation made with a wait, less the shift then (what _give_back compares with)
        self._last_slot = -math.inf
        self._jitter_cap = 0.0
        self._reconcile = policy.accounting == "reconcile"
        self._follow_headers = policy.follow_headers
        self._share_retry_after = policy.share_retry_after
        # the adaptive rate: configured and advertised costs per unit (0.0: none / not known yet), the AIMD
        # factor, when it last changed, and the round counter (bumped by every decrease of the rate)
        self._cfg_req_inv = self._req_inv
        self._cfg_tok_inv = self._tok_inv
        self._adv_req_inv = 0.0
        self._adv_tok_inv = 0.0
        self._backoff = 1.0
        self._backoff_at = -math.inf
        self._epoch = 0
        self._learn_limits = policy.follow_headers and policy.scope == "model"
        # callers sleeping until their reservation, so that a slower rate can move them (insertion-ordered)
        self._sleepers: dict[_Reservation, None] = {}

    @classmethod
    def from_policy(cls, section: RateLimitPolicy, **extras: Any) -> RateLimiter:
        """Build a limiter from a :class:`~ragguard.RateLimitPolicy` plus ``clock``, ``name``, ``rng`` (``lease``
        concerns shared limiters only: a local limiter has no round trips to save)."""
        return cls(**section.model_dump(exclude={"lease"}), **extras)

    # --- read-only views -------------------------------------------------------------------------------

    @property
    def rpm(self) -> float | None:
        """Requests per minute (``None``: no request limit)."""
        return self.policy.rpm

    @property
    def tpm(self) -> float | None:
        """Tokens per minute (``None``: no token limit)."""
        return self.policy.tpm

    @property
    def effective_rpm(self) -> float | None:
        """The request rate enforced now, per minute: ``min(rpm, provider_rpm) · backoff`` (``None``: no request
        limit)."""
        return 60.0 / self._req_inv if self._req_inv else None

    @property
    def effective_tpm(self) -> float | None:
        """The token rate enforced now, per minute (``None``: no token limit)."""
        return 60.0 / self._tok_inv if self._tok_inv else None

    @property
    def provider_rpm(self) -> float | None:
        """The provider's advertised requests per minute (``x-ratelimit-limit-requests``), once seen."""
        return 60.0 / self._adv_req_inv if self._adv_req_inv else None

    @property
    def provider_tpm(self) -> float | None:
        """The provider's advertised tokens per minute (``x-ratelimit-limit-tokens``), once seen."""
        return 60.0 / self._adv_tok_inv if self._adv_tok_inv else None

    @property
    def backoff(self) -> float:
        """The AIMD factor on the rate, in ``[MIN_RATE_BACKOFF, 1]`` (1: no 429 lately)."""
        return self._backoff

    @property
    def scope(self) -> Literal["model", "credential"]:
        """Which callers the provider layer makes share this limiter."""
        return self.policy.scope

    @property
    def capacity_requests(self) -> float:
        """Requests the requests bucket holds when full (``math.inf`` without a request limit)."""
        return self._burst / self._req_inv if self._req_inv else math.inf

    @property
    def capacity_tokens(self) -> float:
        """Tokens the tokens bucket holds when full (``math.inf`` without a token limit)."""
        return self._burst / self._tok_inv if self._tok_inv else math.inf

    @property
    def available_requests(self) -> float:
        """Requests the bucket holds now; negative while earlier callers' reservations are in debt or during a
        pause (``math.inf`` without a request limit)."""
        return self._level(self._req_inv, is_tokens=False)

    @property
    def available_tokens(self) -> float:
        """Tokens the bucket holds now; negative while in debt or paused (``math.inf`` without a token
        limit)."""
        return self._level(self._tok_inv, is_tokens=True)

    @property
    def paused_until(self) -> float:
        """The ``clock`` time until which a shared pause holds every caller (``-inf`` if there never was one;
        a time in the past means not paused)."""
        return self._paused_until

    def _level(self, inv: float, *, is_tokens: bool) -> float:
        if not inv:
            return math.inf
        with self._lock:
            behind = (self._tok_tat if is_tokens else self._req_tat) - self.clock.now()
        if behind <= 0.0:
            return self._burst / inv
        return (self._burst - behind) / inv

    # --- the mechanism ---------------------------------------------------------------------------------

    def reserve(self, requests: float = 1.0, tokens: float = 0.0, *, max_wait: float = math.inf) -> float:
        """Reserve capacity now and return how many seconds the caller must wait before calling (``0.0``: go).

        Low level and synchronous (no waiting happens here): the caller must wait the returned time itself, or
        give the reservation back with :meth:`refund` before anyone else reserves (see there). Unlike
        :meth:`acquire` it does not follow shared pauses that start after it returns.

        Args:
            requests: the cost against the requests bucket (``>= 0``).
            tokens: the cost against the tokens bucket (``>= 0``).
            max_wait: longest acceptable wait, seconds (also capped by the limiter's own ``max_wait``).

        Raises:
            RateLimitTimeout: the wait would exceed ``max_wait``; nothing was reserved.
            ValueError: a negative or NaN cost.
        """
        budget = self._max_wait if self._max_wait < max_wait else max_wait
        reservation = self._reserve(requests, tokens, budget)
        return 0.0 if reservation is None else reservation.wait

    async def acquire(self, requests: float = 1.0, tokens: float = 0.0, *, deadline: float = math.inf) -> float:
        """Wait until a call costing ``requests`` and ``tokens`` may go; return the seconds waited.

        A call that can go at once returns ``0.0`` without yielding to the scheduler.

        Args:
            requests: the cost against the requests bucket (``>= 0``).
            tokens: the cost against the tokens bucket (``>= 0``).
            deadline: absolute time on this limiter's ``clock`` by which the wait must end.

        Raises:
            RateLimitTimeout: the wait would exceed ``min(max_wait, deadline - now)``, raised at once (or as
                soon as a shared pause makes it so); the reservation is given back.
            ValueError: a negative or NaN cost.
        """
        budget = self._max_wait
        if deadline != math.inf:
            left = deadline - self.clock.now()
            if left < budget:
                budget = left
        reservation = self._reserve(requests, tokens, budget)
        if reservation is not None:
            return await self._wait(reservation, budget)
        return 0.0

    def _reserve(self, requests: float, tokens: float, budget: float) -> _Reservation | None:
        """Charge the call; ``None``: it goes now, else the reservation to wait for (and to give back if the
        wait is abandoned)."""
        if not (requests >= 0.0 and tokens >= 0.0):
            raise ValueError(f"rate limiter costs must be >= 0, got requests={requests!r}, tokens={tokens!r}")
        burst = self._burst
        req_cost = requests * self._req_inv  # in seconds of refill
        tok_inv = self._tok_inv  # 0.0 for good without a tpm (the adaptive rate only moves configured limits)
        tok_cost = tokens * tok_inv
        with self._lock:
            now = self.clock.now()
            req_tat = self._req_tat
            tok_tat = self._tok_tat
            # A bucket holds a cost c (capped at capacity, so oversize costs go when it is full) from
            # tat - burst + min(c, burst) on; the call goes when every bucket does.
            at = now
            ready = req_tat - burst + (req_cost if req_cost < burst else burst)
            if ready > at:
                at = ready
            # A call that costs no token (always so without a tpm, unless its token count is infinite: inf × 0 is
            # NaN, left to the general arithmetic) skips the bucket's arithmetic but not its time: the same values.
            ready = tok_tat - burst + (tok_cost if tok_cost < burst else burst) if tok_cost else tok_tat - burst
            if ready > at:
                at = ready
            if self._paused_until > at:
                # Only the pause holds this call: spread the release (hermes-agent#109234).
                at = self._paused_until + self._rng.uniform(0.0, self._jitter_cap)
            wait = at - now
            if wait <= budget or wait <= 0.0:
                # Charge at the admission time: a bucket that would refill past full before then loses the
                # excess, which keeps the window bound when the other bucket is the one that delays the call.
                if req_tat > at:
                    self._req_tat = req_tat + req_cost
                else:
                    self._req_tat = at + req_cost
                    self._req_busy = at
                if tok_tat > at:
                    if tok_cost:
                        self._tok_tat = tok_tat + tok_cost
                elif tok_cost or tok_inv:
                    self._tok_tat = at + tok_cost
                    self._tok_busy = at
                else:
                    self._tok_tat = at  # (the busy mark is only read with a tpm)
                if wait <= 0.0:
                    return None
                shift = self._shift  # read under the lock: exact even if another thread pauses right after
                if at - shift > self._last_slot:
                    self._last_slot = at - shift
                return _Reservation(wait, at, shift, self._epoch, req_cost, tok_cost)
        raise RateLimitTimeout(
            f"rate limiter {self.name!r} needs {wait:.3f} s before admitting the call; "
            f"the wait may last only {budget:.3f} s",
            wait=wait,
            remaining=budget,
        )

    async def _wait(self, reservation: _Reservation, budget: float) -> float:
        """Sleep until the reservation's time, following shared pauses that start meanwhile; give the reservation
        back (see ``_give_back``) if the wait is cancelled or runs past the budget."""
        clock = self.clock
        shift0 = reservation.shift0
        start = clock.now()
        limit_at = start + budget
        base = reservation.at  # where the schedule puts us, without release jitter
        target = base
        late = -1.0
        with self._lock:
            self._sleepers[reservation] = None
        try:
            while True:
                await clock.sleep(target - clock.now())
                with self._lock:
                    moved = reservation.at + (self._shift - shift0)
                    floor = self._paused_until
                    jitter_cap = self._jitter_cap
                candidate = moved if moved >= floor else floor
                if candidate <= base:
                    break  # no pause nor slower rate moved us while we slept
                base = candidate
                target = candidate + (self._rng.uniform(0.0, jitter_cap) if floor > moved else 0.0)
                if target > limit_at:
                    late = target - clock.now()
                    break
        except BaseException:
            self._give_back(reservation)
            raise
        finally:
            with self._lock:
                del self._sleepers[reservation]
        now = clock.now()
        if late >= 0.0:
            self._give_back(reservation)
            raise RateLimitTimeout(
                f"rate limiter {self.name!r} was paused or slowed by the provider: {late:.3f} s more to wait, "
                f"the wait may last only {limit_at - now:.3f} s more",
                wait=late,
                remaining=limit_at - now,
            )
        return now - start

    def _give_back(self, reservation: _Reservation) -> None:
        """Give back the part of an abandoned reservation that no later reservation depends on.

        Go's ``golang.org/x/time/rate`` ``Reservation.CancelAt``: ``restore = tokens - (lastEvent - timeToAct)``
        in units of refill, and nothing once ``timeToAct`` has passed. Each reservation made after this one was
        scheduled with this one's cost in ``tat``; one that goes ``d`` seconds later than this one holds its
        slot with at most ``cost - d`` of that cost to spare, so giving back more would let a newcomer share its
        slot (more than ``capacity + rate·t``). Times are compared before pause shifts (a pause moves every
        waiting reservation and ``tat`` alike). A call admitted at once is not tracked: it arrives before this
        reservation's time, or after it, and then this one is due and gives nothing (a pause since moved ``tat``
        as far as this reservation, which covers the difference).
        """
        with self._lock:
            if reservation.epoch != self._epoch:
                return  # a slower rate stretched the schedule under it: what it may give back is unknown
            now = self.clock.now()
            shift = self._shift
            slot = reservation.at - reservation.shift0
            if slot + shift <= now:
                return  # its time has come: the slot is spent
            spare = reservation.req_cost if reservation.req_cost > reservation.tok_cost else reservation.tok_cost
            later = self._last_slot - slot  # how much later the latest reservation goes, seconds
            if later >= spare:
                return
            paused_until = self._paused_until
            floor = paused_until + self._burst if paused_until > now else now
            cost = reservation.req_cost - later
            if cost > 0.0:
                tat = self._req_tat - cost
                self._req_tat = tat if tat > floor else floor
            cost = reservation.tok_cost - later
            if cost > 0.0:
                tat = self._tok_tat - cost
                self._tok_tat = tat if tat > floor else floor

    def refund(self, requests: float = 0.0, tokens: float = 0.0) -> None:
        """Give back capacity at the end of the schedule: the **newest** reservation only (a :meth:`reserve`
        whose caller gives up before anyone else reserves), or tokens charged but not spent.

        There is no handle to tell which reservation is meant, so the whole amount comes off the end of the
        schedule: giving back an older reservation this way, after later ones were made, would let a newcomer
        take the same slot as one of them. (A caller of :meth:`acquire` or :meth:`run` cancelled while waiting
        gives back its own reservation, clamped to what later reservations leave free.) The level never rises
        above capacity, nor above empty while a shared pause lasts.

        Raises:
            ValueError: a negative or NaN amount.
        """
        if not (requests >= 0.0 and tokens >= 0.0):
            raise ValueError(f"refunds must be >= 0, got requests={requests!r}, tokens={tokens!r}")
        self._refund(requests * self._req_inv, tokens * self._tok_inv)

    def _refund(self, req_cost: float, tok_cost: float) -> None:
        with self._lock:
            now = self.clock.now()
            paused_until = self._paused_until
            floor = paused_until + self._burst if paused_until > now else now
            if req_cost:
                tat = self._req_tat - req_cost
                self._req_tat = tat if tat > floor else floor
            if tok_cost:
                tat = self._tok_tat - tok_cost
                self._tok_tat = tat if tat > floor else floor

    def debit(self, tokens: float, requests: float = 0.0) -> None:
        """Charge extra cost now, without waiting (e.g. tokens the provider counted beyond the estimate).

        The level may go negative; later callers wait for the debt to clear.
        """
        if not (requests >= 0.0 and tokens >= 0.0):
            raise ValueError(f"debits must be >= 0, got requests={requests!r}, tokens={tokens!r}")
        req_cost = requests * self._req_inv
        tok_cost = tokens * self._tok_inv
        with self._lock:
            now = self.clock.now()
            if req_cost:
                tat = self._req_tat
                if tat <= now:
                    tat = self._req_busy = now
                self._req_tat = tat + req_cost
            if tok_cost:
                tat = self._tok_tat
                if tat <= now:
                    tat = self._tok_busy = now
                self._tok_tat = tat + tok_cost

    def pause(self, seconds: float) -> None:
        """Hold every caller of this limiter for ``seconds`` (a provider's Retry-After), see the module doc.

        The buckets restart empty when the pause ends, reservations already waiting move back as a block,
        and callers released exactly at the end get upward-only jitter. A shorter pause inside a longer one
        changes nothing.

        Raises:
            ValueError: ``seconds`` negative, NaN or infinite.
        """
        if not (0.0 <= seconds < math.inf):
            raise ValueError(f"pause must be finite and >= 0 seconds, got {seconds!r}")
        self._pause(seconds)

    def _pause(self, seconds: float) -> None:
        burst = self._burst
        with self._lock:
            now = self.clock.now()
            until = now + seconds
            paused_until = self._paused_until
            resume = paused_until if paused_until > now else now
            shift = until - resume if until > resume else 0.0
            if shift:
                self._shift += shift
                self._paused_until = until
                cap = PAUSE_JITTER_FRACTION * seconds
                if self._req_inv and PAUSE_JITTER_INTERVALS * self._req_inv < cap:
                    cap = PAUSE_JITTER_INTERVALS * self._req_inv
                self._jitter_cap = cap
            # Empty at `until`, and whatever was already waiting moves back by the same amount, in order.
            horizon = until + burst
            if self._req_inv:
                tat = self._req_tat + shift
                if tat > horizon:
                    self._req_tat = tat
                    self._req_busy += shift
                else:
                    self._req_tat, self._req_busy = horizon, until
            if self._tok_inv:
                tat = self._tok_tat + shift
                if tat > horizon:
                    self._tok_tat = tat
                    self._tok_busy += shift
                else:
                    self._tok_tat, self._tok_busy = horizon, until

    def observe(self, headers: RateLimitHeaders) -> None:
        """Lower the levels to the provider's ``remaining_requests`` / ``remaining_tokens`` when those are
        lower (never raise them: the provider is the ground truth when it says less is left); with
        ``scope="model"``, cap the rates to its ``limit_requests`` / ``limit_tokens`` (per minute)."""
        remaining_requests = headers.remaining_requests
        remaining_tokens = headers.remaining_tokens
        burst = self._burst
        with self._lock:
            now = self.clock.now()
            if self._learn_limits:
                self._learn(headers.limit_requests, headers.limit_tokens, now)
            if remaining_requests is not None and self._req_inv:
                # level L <=> tat = now + burst - L·inv
                tat = now + burst - remaining_requests * self._req_inv
                if tat > self._req_tat:
                    if self._req_tat <= now:
                        self._req_busy = now
                    self._req_tat = tat
            if remaining_tokens is not None and self._tok_inv:
                tat = now + burst - remaining_tokens * self._tok_inv
                if tat > self._tok_tat:
                    if self._tok_tat <= now:
                        self._tok_busy = now
                    self._tok_tat = tat

    # --- the adaptive rate (under the lock) ------------------------------------------------------------

    def _learn(self, limit_requests: float | None, limit_tokens: float | None, now: float) -> None:
        changed = False
        if limit_requests is not None and limit_requests > 0.0 and self._cfg_req_inv:
            inv = 60.0 / limit_requests
            if inv != self._adv_req_inv:
                self._adv_req_inv, changed = inv, True
        if limit_tokens is not None and limit_tokens > 0.0 and self._cfg_tok_inv:
            inv = 60.0 / limit_tokens
            if inv != self._adv_tok_inv:
                self._adv_tok_inv, changed = inv, True
        if changed:
            self._retune(now, replay=True)

    def _retune(self, now: float, *, replay: bool = False) -> None:
        """Set the costs per unit to ``max(configured, advertised) / backoff``, keeping the levels (``replay``:
        charging the last burst's admissions at the slower rate); a slower rate starts a new round (429s of
        calls admitted before it do not decrease the rate again)."""
        base = self._paused_until if self._paused_until > now else now  # a pause keeps its end
        burst = self._burst
        backoff = self._backoff
        stretch = 1.0  # the largest slow-down factor of the two buckets ...
        extra = 0.0  # ... and the largest replayed debt, seconds
        if self._cfg_req_inv:
            adv = self._adv_req_inv
            inv = (adv if adv > self._cfg_req_inv else self._cfg_req_inv) / backoff
            old = self._req_inv
            if inv > old:
                k = inv / old
                tat = self._req_tat
                kept = _rescaled(tat, old, inv, base, burst)
                self._req_tat = kept
                if replay and tat > base:
                    busy = self._req_busy if self._req_busy > base - burst else base - burst
                    replayed = busy + (tat - busy) * k
                    if replayed > kept:
                        self._req_tat, self._req_busy, extra = replayed, busy, replayed - kept
                stretch = k
            self._req_inv = inv
        if self._cfg_tok_inv:
            adv = self._adv_tok_inv
            inv = (adv if adv > self._cfg_tok_inv else self._cfg_tok_inv) / backoff
            old = self._tok_inv
            if inv > old:
                k = inv / old
                tat = self._tok_tat
                kept = _rescaled(tat, old, inv, base, burst)
                self._tok_tat = kept
                if replay and tat > base:
                    busy = self._tok_busy if self._tok_busy > base - burst else base - burst
                    replayed = busy + (tat - busy) * k
                    if replayed > kept:
                        self._tok_tat, self._tok_busy = replayed, busy
                        extra = max(extra, replayed - kept)
                stretch = max(stretch, k)
            self._tok_inv = inv
        if stretch > 1.0:
            self._epoch += 1
            shift = self._shift
            for sleeper in self._sleepers:
                # the waiter's current time, moved as its place in the bucket now refills (behind any debt)
                current = sleeper.at + (shift - sleeper.shift0)
                if current > base:
                    sleeper.at += (current - base) * (stretch - 1.0) + extra

    def _back_off(self, epoch: int) -> None:
        """A 429 for a call admitted in round ``epoch``: decrease the rate, once per round."""
        with self._lock:
            if epoch != self._epoch or not (self._cfg_req_inv or self._cfg_tok_inv):
                return
            now = self.clock.now()
            backoff = self._backoff * RATE_BACKOFF
            self._backoff = backoff if backoff > MIN_RATE_BACKOFF else MIN_RATE_BACKOFF
            self._backoff_at = now
            self._retune(now)
            if self._epoch == epoch:
                self._epoch += 1  # at the floor the rate did not change, but the round is over

    def _recover(self) -> None:
        with self._lock:
            now = self.clock.now()
            elapsed = now - self._backoff_at
            if elapsed <= 0.0:
                return
            backoff = self._backoff + RATE_RECOVERY_PER_S * elapsed
            self._backoff = backoff if backoff < 1.0 else 1.0
            self._backoff_at = now
            self._retune(now)

    # --- the guard -------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Wait for ``ctx.requests`` and ``ctx.tokens`` of capacity, run ``call``, then settle the account.

        Raises:
            RateLimitTimeout: the wait would exceed ``min(max_wait, ctx.remaining())``.
            Whatever ``call`` raises (after noting a shared pause if it was rate-limited).
        """
        requests = ctx.requests
        tokens = ctx.tokens
        budget = self._max_wait
        deadline = ctx.deadline
        if deadline != _INF:
            left = deadline - ctx.clock.now()  # ctx.remaining(), inlined
            if left < budget:
                budget = left
        epoch = self._epoch  # the round this call is admitted in (see _back_off)
        reservation = self._reserve(requests, tokens, budget)
        if reservation is not None:
            waited = await self._wait(reservation, budget)
            telemetry.limiter_waited(self.name, waited)
        # The context outlives one attempt: only headers this attempt brought count.
        seen = ctx.rate_headers
        try:
            result = await call()
        except Exception as exc:
            self._after_failure(exc, ctx, seen, requests, tokens, epoch)
            raise
        used = ctx.used_tokens
        if used is not None and self._tok_inv:
            extra = used - tokens
            if extra > 0.0:
                self.debit(extra)
            elif extra < 0.0 and self._reconcile:
                self._refund(0.0, -extra * self._tok_inv)
        if self._follow_headers:
            headers = ctx.rate_headers
            if headers is not None and headers is not seen:
                self.observe(headers)
            if self._backoff != 1.0:
                self._recover()
        return result

    def _after_failure(
        self,
        exc: Exception,
        ctx: CallContext,
        seen: RateLimitHeaders | None,
        requests: float,
        tokens: float,
        epoch: int,
    ) -> None:
        # The failed call keeps its charge: providers count failed requests.
        headers = ctx.rate_headers
        fresh = headers is not None and headers is not seen
        if self._follow_headers and headers is not None and fresh:
            self.observe(headers)
        if not (self._share_retry_after or (self._follow_headers and fresh)):
            return
        try:
            outcome = ctx.classify(exc)
        except Exception:  # a broken classifier must not replace the provider's error
            return
        if not outcome.rate_limited:
            return
        if self._share_retry_after:
            hint = outcome.retry_after
            if hint is None or not hint >= 0.0:
                # No usable hint: the time one request (and this call's tokens) takes to refill.
                if self._req_inv or self._tok_inv:
                    hint = max(max(requests, 1.0) * self._req_inv, max(tokens, 1.0) * self._tok_inv)
                else:
                    hint = DEFAULT_PAUSE
            self._pause(min(hint, MAX_HINT_SECONDS))
        if self._follow_headers and fresh:
            # only a provider that publishes its limits (x-ratelimit-*) moves the rate: a bare 429 pauses
            self._back_off(epoch)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(name={self.name!r}, rpm={self.policy.rpm}, tpm={self.policy.tpm}, "
            f"burst_seconds={self.policy.burst_seconds})"
        )
