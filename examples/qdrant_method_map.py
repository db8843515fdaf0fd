"""Guard any client by naming its methods: Qdrant's embedded mode, no server needed.

    python examples/qdrant_method_map.py   (needs: pip install qdrant-client)

``query_points`` gets the default policy, ``upsert`` a write policy with a small bulkhead; every other method
(``create_collection`` here) is the client's own, untouched.
"""

from __future__ import annotations

import asyncio

from qdrant_client import AsyncQdrantClient, models

import ragguard


async def main() -> None:
    write = ragguard.Policy(concurrency={"max_in_flight": 4}, rate_limit={"rpm": 600})
    client = ragguard.guard(AsyncQdrantClient(location=":memory:"), methods={"query_points": None, "upsert": write})
    await client.create_collection("docs", vectors_config=models.VectorParams(size=3, distance=models.Distance.COSINE))
    await client.upsert(
        "docs",
        points=[
            models.PointStruct(id=1, vector=[1.0, 0.0, 0.0], payload={"text": "refunds within 30 days"}),
            models.PointStruct(id=2, vector=[0.0, 1.0, 0.0], payload={"text": "ten seats on the team plan"}),
        ],
    )
    hits = await client.query_points("docs", query=[0.9, 0.1, 0.0], limit=1, with_payload=True)
    print(hits.points[0].payload)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
