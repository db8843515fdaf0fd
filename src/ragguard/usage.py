"""Usage and cost accounting: tokens in and out per (model, credential scope), what retries cost, and money from
a price table *you* supply.

Every guarded client call that reaches the provider is counted here from the provider's own ``usage`` (OpenAI:
``prompt_tokens`` / ``completion_tokens``, Responses: ``input_tokens`` / ``output_tokens``). ragguard ships no
prices: they change and differ by contract, so a cost appears only for models you priced with :func:`set_prices`::

    ragguard.usage.set_prices({"gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60}})
    ragguard.usage.report()          # UsageReport: per model and scope, tokens, calls, retries, cost

The figures are also OpenTelemetry metrics (``gen_ai.client.token.usage``, ``ragguard.usage.cost``) and part of
:func:`ragguard.health`. The ledger is one per process (a documented registry, like the default backend);
:func:`reset` empties it.

"Retry tokens" are the tokens the retried attempts reserved against the quota (each attempt pays for its own
permit: the estimate of the request, per attempt after the first) — the quota a retry storm burns even though a
failed attempt is not billed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ModelPrice", "UsageLine", "UsageReport", "price_of", "record", "report", "reset", "set_prices"]


class ModelPrice(BaseModel):
    """A model's price, in your currency per million tokens (validated: non-negative)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: float = Field(default=0.0, ge=0)
    output_per_1m: float = Field(default=0.0, ge=0)


class UsageLine(BaseModel):
    """Usage of one (system, model, credential scope): counts since the process started or :func:`reset`."""

    system: str
    model: str
    scope: str = Field(description="the credential fingerprint (a truncated sha256, never the key)")
    calls: int = Field(default=0, description="calls that reached the provider and succeeded")
    failed_calls: int = 0
    attempts: int = Field(default=0, description="upstream attempts, retries included")
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    retry_tokens: float = Field(default=0.0, description="tokens retried attempts reserved against the quota")
    cost: float | None = Field(default=None, description="from set_prices(); None when the model is not priced")


class UsageReport(BaseModel):
    """Every :class:`UsageLine`, and the total cost of the priced ones."""

    lines: list[UsageLine] = Field(default_factory=list)
    total_cost: float | None = None


_lock = threading.Lock()
_lines: dict[tuple[str, str, str], UsageLine] = {}
_prices: dict[str, ModelPrice] = {}


def set_prices(prices: Mapping[str, ModelPrice | Mapping[str, float]]) -> None:
    """Set the price table: model name → :class:`ModelPrice` (or a mapping of its fields). Replaces the previous
    table; costs already counted keep the prices they were counted with.

    Raises:
        pydantic.ValidationError: a price is negative or has an unknown field.
    """
    table = {
        model: p if isinstance(p, ModelPrice) else ModelPrice.model_validate(dict(p)) for model, p in prices.items()
    }
    with _lock:
        _prices.clear()
        _prices.update(table)


def price_of(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """The cost of one call from the price table, ``None`` when ``model`` is not priced."""
    price = _prices.get(model)
    if price is None:
        return None
    return (input_tokens * price.input_per_1m + output_tokens * price.output_per_1m) / 1_000_000


def record(
    system: str,
    model: str,
    scope: str,
    *,
    ok: bool,
    attempts: int,
    input_tokens: int | None,
    output_tokens: int | None,
    retry_tokens: float,
) -> float | None:
    """Count one call that made ``attempts`` upstream attempts; returns its cost (``None``: not priced)."""
    inputs, outputs = input_tokens or 0, output_tokens or 0
    cost = price_of(model, inputs, outputs) if ok else None
    key = (system, model, scope)
    with _lock:
        line = _lines.get(key)
        if line is None:
            line = _lines[key] = UsageLine(system=system, model=model, scope=scope)
        if ok:
            line.calls += 1
        else:
            line.failed_calls += 1
        line.attempts += attempts
        line.retries += max(0, attempts - 1)
        line.input_tokens += inputs
        line.output_tokens += outputs
        line.retry_tokens += retry_tokens
        if cost is not None:
            line.cost = (line.cost or 0.0) + cost
    return cost


def report() -> UsageReport:
    """A snapshot of the ledger."""
    with _lock:
        lines = [line.model_copy() for line in _lines.values()]
    costs = [line.cost for line in lines if line.cost is not None]
    return UsageReport(lines=lines, total_cost=sum(costs) if costs else None)


def reset() -> None:
    """Empty the ledger (the price table stays)."""
    with _lock:
        _lines.clear()
