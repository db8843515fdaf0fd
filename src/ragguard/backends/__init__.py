"""Where shared guard state lives: in process memory (:class:`MemoryBackend`), later also in Redis."""

from .memory import MemoryBackend, default_backend

__all__ = ["MemoryBackend", "default_backend"]
