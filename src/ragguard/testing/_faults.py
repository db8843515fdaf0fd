"""Seeded fault injection and latency for the simulators.

Every admitted request draws exactly one number from the fault generator and one from the latency generator,
whatever happens to it, so a given seed yields the same sequence of outcomes for the same sequence of requests
(sent one after another; concurrent requests draw in arrival order).

The fault kinds every simulator knows (:data:`FAULT_KINDS`) are laid out on ``[0, 1)`` first; the response faults
only the OpenAI simulator injects (:data:`RESPONSE_FAULT_KINDS`: slow answers, malformed JSON, a wrong content
type) come after them, so adding them never changes which requests a seed gives the older kinds.
"""

from __future__ import annotations

import random
from typing import Literal

__all__ = ["ALL_FAULT_KINDS", "FAULT_KINDS", "RESPONSE_FAULT_KINDS", "FaultKind", "FaultRoller", "LatencyModel"]

FaultKind = Literal[
    "drop", "error_500", "error_503", "stall", "stream_break", "slow", "malformed", "wrong_content_type"
]
#: the fault kinds every simulator knows, in the order their probability ranges are laid out on [0, 1)
FAULT_KINDS: tuple[FaultKind, ...] = ("drop", "error_500", "error_503", "stall", "stream_break")
#: the response faults (OpenAI simulator), laid out after :data:`FAULT_KINDS`
RESPONSE_FAULT_KINDS: tuple[FaultKind, ...] = ("slow", "malformed", "wrong_content_type")
#: every fault kind, in layout order
ALL_FAULT_KINDS: tuple[FaultKind, ...] = FAULT_KINDS + RESPONSE_FAULT_KINDS


class FaultRoller:
    """Picks at most one fault per admitted request.

    One uniform draw ``u`` in ``[0, 1)`` is laid against consecutive ranges: ``drop_rate``, then
    ``error_rate`` (its first half answers 500, its second half 503), then ``stall_rate``, then
    ``stream_break_rate``, then ``slow_rate``, ``malformed_rate`` and ``wrong_content_type_rate``.
    A stream break only applies to streamed requests; for others that range means no fault.
    """

    __slots__ = ("_bounds", "_rng", "_seed")

    def __init__(
        self,
        *,
        seed: int,
        drop_rate: float,
        error_rate: float,
        stall_rate: float,
        stream_break_rate: float,
        slow_rate: float = 0.0,
        malformed_rate: float = 0.0,
        wrong_content_type_rate: float = 0.0,
    ) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        rates = (
            drop_rate,
            error_rate / 2,
            error_rate / 2,
            stall_rate,
            stream_break_rate,
            slow_rate,
            malformed_rate,
            wrong_content_type_rate,
        )
        bounds: list[tuple[float, FaultKind]] = []
        edge = 0.0
        for kind, rate in zip(ALL_FAULT_KINDS, rates, strict=True):
            if rate > 0:
                edge += rate
                bounds.append((edge, kind))
        self._bounds = tuple(bounds)

    def reset(self) -> None:
        self._rng = random.Random(self._seed)

    def continue_from(self, other: FaultRoller) -> None:
        """Carry on ``other``'s sequence (same seed, same position) with this roller's rates: a simulator
        reconfigured at run time keeps its seeded sequence instead of starting it again."""
        self._seed = other._seed
        self._rng = other._rng

    def roll(self, *, streaming: bool) -> FaultKind | None:
        u = self._rng.random()
        for edge, kind in self._bounds:
            if u < edge:
                if kind == "stream_break" and not streaming:
                    return None
                return kind
        return None


class LatencyModel:
    """``(base + per_token · tokens) · (1 + uniform(-jitter, +jitter))`` seconds, never negative."""

    __slots__ = ("_rng", "_seed", "base", "jitter", "per_input_token", "per_token")

    def __init__(self, *, seed: int, base: float, per_token: float, per_input_token: float, jitter: float) -> None:
        # A generator of its own, so changing the latency settings never changes the fault sequence.
        self._seed = seed
        self._rng = random.Random(seed ^ 0x5EED_1A7E)
        self.base = base
        self.per_token = per_token
        self.per_input_token = per_input_token
        self.jitter = jitter

    def reset(self) -> None:
        self._rng = random.Random(self._seed ^ 0x5EED_1A7E)

    def factor(self) -> float:
        """One jitter factor (a draw is made even when jitter is 0, keeping sequences aligned)."""
        u = self._rng.random()
        return max(0.0, 1.0 + self.jitter * (2.0 * u - 1.0))
