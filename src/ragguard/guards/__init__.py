"""Domain-free resilience primitives over awaitables, and :class:`Pipeline` to compose them."""
