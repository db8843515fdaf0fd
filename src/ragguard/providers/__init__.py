"""Provider knowledge: which errors are retryable, what a request costs, how to read a provider's hints."""
