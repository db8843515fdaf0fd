"""Ingestion into a vector index: naive per-vector upserts vs ragguard's guarded bulk upsert, in one run.

Both write the same vectors (with metadata) through the real ``pinecone`` SDK (``IndexAsyncio``) to
:class:`ragguard.testing.PineconeSimulator`, served in a child process with a write limit (upsert requests per
second, as a serverless index enforces):

- ``naive``: one ``upsert`` per vector, 100 at a time on one client (the SDK's own retries, honouring
  ``Retry-After``); vectors whose request still fails are lost. (All at once is worse still: with 5,000
  requests queued on its connection pool the SDK sent none within a minute, and cancelling them took minutes.)
- ``guarded``: ``ragguard.guard(index, policy).upsert(vectors=all)``: chunks of up to 1,000 vectors / 2 MB,
  paced to the write limit, retried per chunk.

Prints wall seconds, vectors stored, requests, 429s and vectors per second, with each mode's throughput as a ratio
to guarded. Usage::

    python -m benchmarks.ingest            # 5,000 vectors
    python -m benchmarks.ingest --quick    # 1,000 vectors
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

import anyio
import httpx
from pinecone import Pinecone
from rich.console import Console
from rich.table import Table

import ragguard
from ragguard.testing import PineconeSimulator, PineconeSimulatorConfig, serve

DIMENSION = 32
NAMESPACE = "bench"
#: longest a mode may run, seconds (naive modes are cut off and counted as they stand)
CAP_S = 60.0
#: per-vector upserts the naive mode keeps in flight
NAIVE_IN_FLIGHT = 100


def vectors(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": ragguard.stable_id(f"passage {i}", namespace=NAMESPACE),
            "values": [((i * 31 + j * 17) % 97) / 97.0 for j in range(DIMENSION)],
            "metadata": {"text": f"passage {i}", "source": f"doc-{i // 50}"},
        }
        for i in range(n)
    ]


async def naive(host: str, batch: list[dict[str, Any]]) -> None:
    index = Pinecone(api_key="bench").IndexAsyncio(host=host)

    gate = anyio.Semaphore(NAIVE_IN_FLIGHT)

    async def one(vector: dict[str, Any]) -> None:
        async with gate:
            with contextlib.suppress(Exception):  # lost: a first version rarely notices
                await index.upsert(vectors=[vector], namespace=NAMESPACE)

    try:
        with anyio.move_on_after(CAP_S):
            async with anyio.create_task_group() as tg:
                for vector in batch:
                    tg.start_soon(one, vector)
    finally:
        await index.close()


async def guarded(host: str, batch: list[dict[str, Any]], write_rps: float) -> None:
    policy = ragguard.Policy(rate_limit={"rpm": write_rps * 60, "burst_seconds": 0.7})  # type: ignore[arg-type]
    index = ragguard.guard(Pinecone(api_key="bench").IndexAsyncio(host=host), policy, backend=ragguard.MemoryBackend())
    try:
        with anyio.move_on_after(CAP_S):
            await index.upsert(vectors=batch, namespace=NAMESPACE)
    finally:
        await index.close()


async def measure(n: int, write_rps: float) -> list[tuple[str, float, int, int, int]]:
    """Both modes, one after the other: (mode, wall s, vectors stored, requests, 429s) each."""
    batch = vectors(n)
    config = PineconeSimulatorConfig(dimension=DIMENSION, write_rps=write_rps, retry_after="fractional")
    rows: list[tuple[str, float, int, int, int]] = []
    with serve(PineconeSimulator(config), mode="process") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as control:
            for mode in ("naive", "guarded"):
                (await control.post("/_sim/reset")).raise_for_status()
                await anyio.sleep(1.0)  # the write bucket refills: every mode starts with a full burst
                (await control.post("/_sim/reset")).raise_for_status()
                started = time.perf_counter()
                if mode == "guarded":
                    await guarded(server.url, batch, write_rps)
                else:
                    await naive(server.url, batch)
                wall = time.perf_counter() - started
                stats = (await control.get("/_sim/stats")).json()
                statuses = stats.get("responses_by_status", {})
                rows.append(
                    (
                        mode,
                        wall,
                        int(stats.get("vectors_stored", 0)),
                        int(stats.get("requests_total", 0)),
                        int(statuses.get("429", statuses.get(429, 0))),
                    )
                )
    return rows


def report(rows: list[tuple[str, float, int, int, int]], n: int, write_rps: float) -> list[dict[str, Any]]:
    """Print the table; the JSON-ready rows."""
    best = next(stored / wall for mode, wall, stored, _, _ in rows if mode == "guarded")
    table = Table(
        title=f"Ingesting {n:,} vectors (dimension {DIMENSION}, metadata), write limit {write_rps:g} upserts/s",
        caption="stored, requests, 429s: as the simulator counted them · vectors/s: stored ÷ wall · vs guarded: "
        "this mode's vectors/s ÷ guarded's",
    )
    for header in ("mode", "wall s", "stored", "requests", "429s", "vectors/s", "vs guarded"):
        table.add_column(header, justify="left" if header == "mode" else "right")
    out: list[dict[str, Any]] = []
    for mode, wall, stored, requests, too_many in rows:
        rate = stored / wall if wall else 0.0
        table.add_row(
            mode, f"{wall:.2f}", f"{stored:,}", f"{requests:,}", f"{too_many:,}", f"{rate:,.0f}", f"{rate / best:.3f}×"
        )
        out.append(
            {
                "mode": mode,
                "wall_s": round(wall, 4),
                "stored": stored,
                "requests": requests,
                "429s": too_many,
                "vectors_per_s": round(rate, 1),
                "ratio_to_guarded": rate / best,
            }
        )
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    guarded = next(r for r in out if r["mode"] == "guarded")
    naive = next((r for r in out if r["mode"] == "naive"), None)
    if naive is not None and naive["vectors_per_s"]:
        print(
            f"guarded: {guarded['vectors_per_s'] / naive['vectors_per_s']:,.0f}× naive's vectors/s, stored "
            f"{guarded['stored']:,} vs {naive['stored']:,} of {n:,}, with {guarded['requests']:,} requests vs "
            f"{naive['requests']:,}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="1,000 vectors instead of 5,000")
    parser.add_argument("--vectors", type=int, default=None, help="how many vectors to ingest")
    parser.add_argument("--write-rps", type=float, default=20.0, help="the index's write limit (default 20/s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    n = args.vectors or (1_000 if args.quick else 5_000)
    rows = anyio.run(measure, n, args.write_rps)
    results = report(rows, n, args.write_rps)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(
                {"benchmark": "benchmarks.ingest", "vectors": n, "write_rps": args.write_rps, "modes": results},
                out,
                indent=2,
            )
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
