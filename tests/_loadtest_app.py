"""An app for ``tests/test_loadtest.py`` to load-test: ``ragguard loadtest`` imports it after setting the
environment, so what it reads at import is the simulators' addresses."""

from __future__ import annotations

import functools
import os
from typing import Any

import anyio
from openai import AsyncOpenAI, OpenAI

import ragguard

#: the environment as this module saw it when it was imported
SEEN = {name: os.environ.get(name) for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "PINECONE_HOST")}
NOT_CALLABLE = 42
DIM = 8


@functools.cache
def _plain() -> AsyncOpenAI:
    return AsyncOpenAI(max_retries=0)


@functools.cache
def _guarded() -> Any:
    return ragguard.guard(AsyncOpenAI(), ragguard.Policy(rate_limit={"rpm": 1200}), backend=ragguard.MemoryBackend())


async def unguarded(user: int) -> None:
    await _plain().embeddings.create(model="text-embedding-3-small", input=f"question {user}")


async def guarded(user: int) -> None:
    await _guarded().embeddings.create(model="text-embedding-3-small", input=f"question {user}")


def sync_embed(user: int) -> None:
    """A plain function (run in a thread): users 3, 7, 11… fail before calling."""
    if user % 4 == 3:
        raise ValueError("this user's input is invalid")
    with OpenAI(max_retries=0) as client:
        client.embeddings.create(model="text-embedding-3-small", input=f"question {user}")


async def tick(user: int) -> None:
    await anyio.sleep(0.01)


async def stall(user: int) -> None:
    await anyio.sleep(60)


@functools.cache
def _index() -> Any:
    from pinecone import Pinecone

    index = Pinecone().IndexAsyncio(host=os.environ["PINECONE_HOST"])
    return ragguard.guard(index, backend=ragguard.MemoryBackend())


def _vector(i: int) -> list[float]:
    return [float((i * 7 + j) % 11 + 1) for j in range(DIM)]


async def ingest() -> None:
    """Setup: store 20 vectors (the index keeps them for the users)."""
    await _index().upsert(vectors=[{"id": f"doc-{i}", "values": _vector(i)} for i in range(20)], namespace="kb")


async def search(user: int) -> None:
    found = await _index().query(vector=_vector(user), top_k=3, namespace="kb")
    if len(found.matches) != 3:
        raise LookupError(f"expected 3 matches, got {len(found.matches)}")
