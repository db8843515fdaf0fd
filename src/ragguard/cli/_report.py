"""What ``ragguard demo`` and ``ragguard loadtest`` share: percentiles, figures from the simulators' stats, the
quota's lower bound on wall time, the console the tables print on, and the check for optional packages."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "missing_modules",
    "percentile",
    "report_console",
    "simulator_figures",
    "theoretical_min_s",
    "write_json",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values`` by the nearest-rank method (the smallest value with at least
    ``q · n`` values at or below it); ``0.0`` for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def simulator_figures(stats: Mapping[str, Any]) -> tuple[int, int, int, dict[str, float], dict[str, float]]:
    """From the body of an OpenAI simulator's ``GET /_sim/stats``: requests received, 429s answered, tokens
    charged, and per model the requests and tokens admitted."""
    upstream = int(stats["requests_total"])
    by_status = stats.get("responses_by_status", {})
    too_many = int(by_status.get("429", by_status.get(429, 0)))
    tokens = int(stats["tokens_admitted"])
    buckets: dict[str, Any] = stats.get("buckets", {})
    per_model_requests = {model: float(b["requests_admitted"]) for model, b in buckets.items()}
    per_model_tokens = {model: float(b["tokens_admitted"]) for model, b in buckets.items()}
    return upstream, too_many, tokens, per_model_requests, per_model_tokens


def theoretical_min_s(
    requests: Mapping[str, float], tokens: Mapping[str, float], rpm: float, tpm: float, burst_s: float
) -> float:
    """The least wall time (s) the quota allows for these per-model request and token counts.

    Each model has its own buckets refilling at ``rpm/60`` and ``tpm/60`` per second and starting full
    (``burst_s`` seconds of refill), so a model needing ``R`` requests and ``T`` tokens needs at least
    ``max((R - burst_R)/(rpm/60), (T - burst_T)/(tpm/60))`` seconds; the scenario needs the slowest model's.
    """
    need = 0.0
    for model in set(requests) | set(tokens):
        r = requests.get(model, 0.0)
        t = tokens.get(model, 0.0)
        need = max(need, (r - rpm / 60 * burst_s) / (rpm / 60), (t - tpm / 60 * burst_s) / (tpm / 60))
    return max(0.0, need)


def report_console() -> Any:
    """A ``rich`` console for the report: the terminal's width, or 180 columns on a pipe or in a CI log (so a wide
    table is not wrapped)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))
    return console


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as indented JSON (UTF-8) to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)


def missing_modules(*names: str) -> list[str]:
    """The top-level modules among ``names`` that cannot be imported here (looked up, not imported)."""
    return [name for name in names if importlib.util.find_spec(name) is None]
