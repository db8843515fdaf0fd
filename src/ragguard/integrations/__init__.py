"""Integrations with application frameworks, each behind its own extra and imported only on demand.

- :mod:`ragguard.integrations.llama_index` (``pip install "ragguard[llamaindex]"``): guarded LlamaIndex
  embedding models and LLMs, ``guard_settings(Settings)``, and a rate limiter for LlamaIndex's own
  ``rate_limiter`` hook.

Nothing here is imported by ``import ragguard``: a framework is loaded only when its integration module is.
"""

from __future__ import annotations

__all__: list[str] = []
