"""An ordinary LlamaIndex app, before and after ragguard: the diff is an import, a policy and one call.

The app indexes this project's own ``docs/`` with ``OpenAIEmbedding`` and answers many concurrent ``aquery``
calls with the ``OpenAI`` LLM. Both run twice against ragguard's OpenAI simulator, which enforces an account's
rate limits on loopback:

- **before**: the app as it is. Every query embeds its question and asks the LLM at once; the provider answers
  most of the burst with 429s, and each model retries on its own — LlamaIndex's tenacity retries *around* the
  OpenAI SDK's own retries, so ``max_retries=2`` is up to 6 HTTP attempts per call;
- **after**: the same app plus ``guard_settings(Settings, policy)``: the queries' embeddings are micro-batched,
  requests and tokens are paced to the account's limits, and a call makes at most ``policy.retry.attempts``.

Runs offline (tokenizer and sentence splitter are local; the models talk to the simulator only)::

    pip install "ragguard[llamaindex,testing]"
    python examples/llamaindex_app.py [--queries 150] [--rpm 1200] [--tpm 2000000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

import ragguard  # after: +1
from ragguard.integrations.llama_index import guard_settings  # after: +1
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

CORPUS = Path(__file__).resolve().parent.parent / "docs"
API_KEY = "sk-example"
QUESTIONS = (
    "How does ragguard stop retries from multiplying?",
    "What happens when the provider answers 429?",
    "How do several processes share one rate limit?",
    "What does the circuit breaker count as a failure?",
    "How are embeddings cached, and for how long?",
    "Which guards run before the rate limiter?",
    "How do I guard a vector database client?",
    "What does micro-batching save?",
)


def words(text: str) -> list[str]:
    """A local tokenizer (LlamaIndex's default, tiktoken, would download its encoding on first use)."""
    return text.split()


# --- the app -------------------------------------------------------------------------------------------------


def configure(base_url: str) -> None:
    """The app's models, as any LlamaIndex app sets them (here pointed at the simulator)."""
    Settings.tokenizer = words
    Settings.embed_model = OpenAIEmbedding(
        model="text-embedding-3-small", api_base=base_url, api_key=API_KEY, max_retries=2
    )
    Settings.llm = OpenAI(model="gpt-4o-mini", api_base=base_url, api_key=API_KEY, max_retries=2)


def build_index() -> VectorStoreIndex:
    documents = SimpleDirectoryReader(str(CORPUS), required_exts=[".md"]).load_data()
    splitter = SentenceSplitter(chunk_size=128, chunk_overlap=16, tokenizer=words)
    return VectorStoreIndex.from_documents(documents, transformations=[splitter])  # sync embeddings


async def answer(index: VectorStoreIndex, questions: list[str]) -> list[Any]:
    engine = index.as_query_engine(similarity_top_k=2)
    try:
        return await asyncio.gather(*(_ask(engine, i, q) for i, q in enumerate(questions)), return_exceptions=True)
    finally:
        await _close_connections()


async def _close_connections() -> None:
    """Housekeeping: close the models' async HTTP connections while this event loop still runs."""
    for model in (Settings.embed_model, Settings.llm):
        client = getattr(getattr(model, "inner", model), "_aclient", None)
        if client is not None:
            await client.close()


# --- measurement only: HTTP attempts of each logical call (a query's embedding, a query's chat) ------------------

_QUERY: contextvars.ContextVar[int | None] = contextvars.ContextVar("query", default=None)


async def _ask(engine: Any, number: int, question: str) -> Any:
    _QUERY.set(number)  # this task's context: every HTTP request it sends counts for this query
    return await engine.aquery(question)


@contextlib.contextmanager
def http_attempts() -> Iterator[dict[tuple[int, str], int]]:
    """Count each HTTP request (the SDK's and LlamaIndex's retries included) against the query and endpoint that
    sent it. A micro-batched embedding request counts for the query whose task sent the batch."""
    counts: dict[tuple[int, str], int] = {}
    send = httpx.AsyncClient.send

    async def counting_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        query = _QUERY.get()
        if query is not None:
            call = (query, request.url.path.rsplit("/", 1)[-1])
            counts[call] = counts.get(call, 0) + 1
        return await send(self, request, **kwargs)

    httpx.AsyncClient.send = counting_send  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        httpx.AsyncClient.send = send  # type: ignore[method-assign]


# --- before / after --------------------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    queries: int
    succeeded: int
    embedding_requests: int
    chat_requests: int
    upstream_429: int
    #: most HTTP attempts one logical call made (one query's embedding or one query's chat)
    attempts_max: int
    wall_s: float

    @property
    def upstream_requests(self) -> int:
        return self.embedding_requests + self.chat_requests


def questions_for(queries: int) -> list[str]:
    """Distinct questions, a third of them the same popular one (as real traffic repeats itself)."""
    return [
        QUESTIONS[0] if i % 3 == 0 else f"{QUESTIONS[i % len(QUESTIONS)]} (asked by user {i})" for i in range(queries)
    ]


def policy_for(rpm: float, tpm: float) -> ragguard.Policy:  # after: the policy
    """The account's published limits; and at most 30 % of a second's quota in flight, so requests granted a
    permit while LlamaIndex keeps the event loop busy cannot reach the provider in a burst beyond its own."""
    return ragguard.Policy(
        rate_limit={"rpm": rpm, "tpm": tpm}, concurrency={"max_in_flight": max(2, int(rpm / 60 * 0.3))}
    )


def run(mode: str, served: Served[OpenAISimulator], queries: int, rpm: float, tpm: float) -> Run:
    served.reset()
    configure(served.base_url)
    if mode == "after":
        guard_settings(Settings, policy_for(rpm, tpm), ragguard.MemoryBackend())  # after: the call (fresh state)
    started = time.monotonic()
    index = build_index()
    with http_attempts() as attempts:
        results = asyncio.run(answer(index, questions_for(queries)))
    wall = time.monotonic() - started
    stats = served.stats()
    by_endpoint = stats.requests_by_endpoint
    return Run(
        mode=mode,
        queries=queries,
        succeeded=sum(not isinstance(result, BaseException) for result in results),
        embedding_requests=by_endpoint.get("/v1/embeddings", 0),
        chat_requests=by_endpoint.get("/v1/chat/completions", 0),
        upstream_429=stats.responses_by_status.get(429, 0),
        attempts_max=max(attempts.values(), default=0),
        wall_s=wall,
    )


def compare(queries: int = 150, rpm: float = 1_200, tpm: float = 2_000_000) -> list[Run]:
    """Run the app before and after ragguard against one simulated account; restore LlamaIndex's settings."""
    import llama_index.core

    saved = (Settings._llm, Settings._embed_model, llama_index.core.global_tokenizer)
    simulator = OpenAISimulator(SimulatorConfig(rpm=rpm, tpm=tpm, seed=7))
    try:
        with serve(simulator) as served:
            return [run(mode, served, queries, rpm, tpm) for mode in ("before", "after")]
    finally:
        Settings._llm, Settings._embed_model, llama_index.core.global_tokenizer = saved


def table(runs: list[Run]) -> str:
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("queries answered", lambda r: f"{r.succeeded}/{r.queries}"),
        ("upstream requests", lambda r: f"{r.upstream_requests}"),
        ("  embeddings", lambda r: f"{r.embedding_requests}"),
        ("  chat", lambda r: f"{r.chat_requests}"),
        ("upstream 429s", lambda r: f"{r.upstream_429} ({r.upstream_429 / max(r.upstream_requests, 1):.0%})"),
        ("most HTTP attempts, one call", lambda r: f"{r.attempts_max}"),
        ("wall time", lambda r: f"{r.wall_s:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{r.mode:>16}" for r in runs)]
    lines += [f"{name:<{width}}" + "".join(f"{cell(r):>16}" for r in runs) for name, cell in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--queries", type=int, default=150, help="concurrent aquery calls (default 150)")
    parser.add_argument("--rpm", type=float, default=1_200, help="the account's requests per minute, per model")
    parser.add_argument("--tpm", type=float, default=2_000_000, help="the account's tokens per minute, per model")
    args = parser.parse_args(argv)
    logging.getLogger("llama_index").setLevel(logging.ERROR)  # "before" logs each of its retries: hundreds
    print(table(compare(args.queries, args.rpm, args.tpm)))


if __name__ == "__main__":
    main()
