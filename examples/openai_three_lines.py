"""Wrap an OpenAI client in three lines, then use it exactly as before.

Runs offline: it starts ragguard's OpenAI simulator on loopback and points the real SDK at it.
Against the real API, drop the simulator and keep the three marked lines.

    python examples/openai_three_lines.py
"""

from __future__ import annotations

import anyio
from openai import AsyncOpenAI

import ragguard  # 1
from ragguard.testing import OpenAISimulator, serve


async def main(base_url: str) -> None:
    client = ragguard.guard(AsyncOpenAI(base_url=base_url, api_key="sk-example"))  # 2
    emb = await client.embeddings.create(model="text-embedding-3-small", input="hello")  # 3: as before
    chat = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], max_tokens=20
    )
    print(f"embedding of {len(emb.data[0].embedding)} floats; reply: {chat.choices[0].message.content!r}")
    await client.close()


if __name__ == "__main__":
    with serve(OpenAISimulator()) as server:
        anyio.run(main, server.base_url)
