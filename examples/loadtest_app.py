"""Load-test your own code with ``ragguard loadtest``: one support-bot handler, unguarded and guarded.

Each user embeds a question and asks a chat completion with a fixed context, through the real ``openai`` SDK.
``ragguard loadtest`` serves a rate-limited OpenAI simulator on loopback and sets ``OPENAI_BASE_URL`` and
``OPENAI_API_KEY`` before it imports this module, so ``AsyncOpenAI()`` here talks to the simulator:

    ragguard loadtest examples/loadtest_app.py:unguarded examples/loadtest_app.py:guarded \\
        --users 300 --rpm 3000 --tpm 1000000

``unguarded`` is what most apps start with (one shared client, the SDK's own two retries); ``guarded`` is the same
handler on ``ragguard.guard(AsyncOpenAI(), POLICY)`` with the quota the account has. ``python
examples/loadtest_app.py`` runs that command with 100 users.
"""

from __future__ import annotations

import functools
from typing import Any

from openai import AsyncOpenAI

import ragguard

#: the quota your account has (here: what the command above gives the simulator)
POLICY = ragguard.Policy(rate_limit={"rpm": 3000, "tpm": 1_000_000})

CONTEXT = (
    "Passwords can be reset from the sign-in page. Annual plans cancelled within 30 days are refunded in full. "
    "The team plan includes ten seats; more can be added from the billing page."
)
QUESTIONS = (
    "How do I reset my password?",
    "What is the refund policy for annual plans?",
    "How many seats does the team plan include?",
)


@functools.cache
def _plain_client() -> AsyncOpenAI:
    # made on first use, inside the running event loop, and shared by every user (as a web app shares it)
    return AsyncOpenAI()


@functools.cache
def _guarded_client() -> Any:
    return ragguard.guard(AsyncOpenAI(), POLICY)


async def _answer(client: Any, user: int) -> str:
    question = f"{QUESTIONS[user % len(QUESTIONS)]} (ticket {user})"
    await client.embeddings.create(model="text-embedding-3-small", input=question)
    chat = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": f"Answer from this context only: {CONTEXT}"},
            {"role": "user", "content": question},
        ],
        max_tokens=64,
        temperature=0,
    )
    return str(chat.choices[0].message.content)


async def unguarded(user: int) -> str:
    """One user's request on a plain client."""
    return await _answer(_plain_client(), user)


async def guarded(user: int) -> str:
    """The same request on a guarded client."""
    return await _answer(_guarded_client(), user)


if __name__ == "__main__":
    from ragguard.cli import main

    raise SystemExit(
        main(
            [
                "loadtest",
                f"{__file__}:unguarded",
                f"{__file__}:guarded",
                "--users",
                "100",
                "--rpm",
                "3000",
                "--tpm",
                "1000000",
            ]
        )
    )
