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
    policy = ragguard.Policy(rate_limit={"rpm": write_rps * 60, "burst_seconds": 0.7})
    index = ragguard.guard(Pinecone(api_key="bench").IndexAsyncio(host=host), policy, backend=ragguard.MemoryBackend())
    try:
        with anyio.move_on_after(CAP_S):
            await index.upsert(vectors=batch, namespace=NAMESPACE)
    finally:
        await index.close()


async def main(n: int, write_rps: float) -> None:
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
    best = next(stored / wall for mode, wall, stored, _, _ in rows if mode == "guarded")
    table = Table(
        title=f"Ingesting {n:,} vectors (dimension {DIMENSION}, metadata), write limit {write_rps:g} upserts/s"
    )
    for header in ("mode", "wall s", "stored", "requests", "429s", "vectors/s", "vs guarded"):
        table.add_column(header, justify="left" if header == "mode" else "right")
    for mode, wall, stored, requests, too_many in rows:
        rate = stored / wall if wall else 0.0
        table.add_row(
            mode, f"{wall:.2f}", f"{stored:,}", f"{requests:,}", f"{too_many:,}", f"{rate:,.0f}", f"{rate / best:.3f}×"
        )
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 vectors instead of 5,000")
    parser.add_argument("--vectors", type=int, default=None, help="how many vectors to ingest")
    parser.add_argument("--write-rps", type=float, default=20.0, help="the index's write limit (default 20/s)")
    args = parser.parse_args()
    anyio.run(main, args.vectors or (1_000 if args.quick else 5_000), args.write_rps)
