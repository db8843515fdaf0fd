"""``GuardedLLM``: any LlamaIndex ``LLM`` behind the pipeline, with token-aware limits, sync and async paths alike."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._sync import run_in_worker, run_sync
from .._tokens import TokenEstimator, default_estimator, estimate_chat_tokens
from ..backends.base import Backend
from ..backends.memory import default_backend
from ..config import Policy
from ..errors import ConfigError, StreamInterrupted
from ..guards.pipeline import Pipeline
from ..providers.generic import build_pipeline
from ._llama_common import (
    classify_llama,
    credential_of,
    note_error,
    slot_before_permit,
    switch_off_retries,
    warn_retries,
)

__all__ = ["GuardedLLM"]

_EMPTY: Any = object()


def _int_field(source: Any, name: str) -> int | None:
    value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _charged(response: Any, completion_max: int) -> float | None:
    """The tokens the provider counts for a response, from its ``usage`` (OpenAI's rule: prompt + max output
    when a max was set, else prompt + completion), or ``None`` when the response does not say."""
    raw = getattr(response, "raw", None)
    usage = raw.get("usage") if isinstance(raw, dict) else getattr(raw, "usage", None)
    sources = [usage] if usage is not None else []
    sources.append(getattr(response, "additional_kwargs", None) or {})
    for source in sources:
        prompt = _int_field(source, "prompt_tokens")
        if prompt is None:
            continue
        if completion_max:
            return float(prompt + completion_max)
        total = _int_field(source, "total_tokens")
        return float(total if total is not None else prompt)
    return None


async def _async_rest(first: Any, stream: Any) -> AsyncGenerator[Any, None]:
    if first is not _EMPTY:
        yield first
    while True:
        try:
            item = await stream.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:
            raise StreamInterrupted("the stream broke after its first chunk") from exc
        yield item


def _sync_rest(first: Any, stream: Any) -> Generator[Any, None, None]:
    if first is not _EMPTY:
        yield first
    while True:
        try:
            item = next(stream)
        except StopIteration:
            return
        except Exception as exc:
            raise StreamInterrupted("the stream broke after its first chunk") from exc
        yield item


class _LLMCore:
    """The pipeline of one guarded LLM and what a call costs; attempts call the wrapped model's public methods
    (so its callbacks and instrumentation report each attempt), sync ones in a worker thread."""

    def __init__(self, llm: LLM, policy: Policy, backend: Backend, *, estimator: TokenEstimator, clock: Clock) -> None:
        self.llm = llm
        self.policy = policy
        self.estimator = estimator
        name = llm.metadata.model_name
        tag = credential_of(llm) or "-"
        self.pipeline: Pipeline = slot_before_permit(
            build_pipeline(
                policy,
                backend,
                breaker=f"llama_index.llm:{tag}:{name}",
                label=f"llama_index:llm:{name}",
                bucket=f"llama_index:{tag}" if policy.rate_limit.scope == "credential" else f"llama_index:{tag}:{name}",
                bulkhead=f"llama_index:{tag}",
                clock=clock,
                classify=classify_llama,
            )
        )

    def _max_output(self, kwargs: dict[str, Any]) -> int:
        for source in (kwargs, self.llm):
            for name in ("max_completion_tokens", "max_tokens"):
                value = _int_field(source, name)
                if value is not None and value > 0:
                    return value
        return 0

    def _context(self, method: str, prompt: Any, kwargs: dict[str, Any]) -> tuple[CallContext, int]:
        """The call's context, charged at admission as OpenAI counts: prompt estimate + max output tokens."""
        if isinstance(prompt, str):
            tokens = estimate_chat_tokens([{"role": "user", "content": prompt}], self.estimator)
        else:
            tokens = estimate_chat_tokens(prompt, self.estimator)
        completion_max = self._max_output(kwargs)
        return self.pipeline.context(tokens=float(tokens + completion_max), operation=method), completion_max

    async def acall(self, method: str, prompt: Any, kwargs: dict[str, Any]) -> Any:
        """``await llm.<method>(prompt, **kwargs)`` through the pipeline (``achat`` / ``acomplete``)."""
        ctx, completion_max = self._context(method, prompt, kwargs)
        fn: Callable[..., Awaitable[Any]] = getattr(self.llm, method)

        async def attempt() -> Any:
            ctx.used_tokens = None
            try:
                response = await fn(prompt, **kwargs)
            except Exception as exc:
                note_error(ctx, exc)
                raise
            ctx.used_tokens = _charged(response, completion_max)
            return response

        return await self.pipeline.run(attempt, ctx)

    def call(self, method: str, prompt: Any, kwargs: dict[str, Any]) -> Any:
        """``llm.<method>(prompt, **kwargs)`` (``chat`` / ``complete``): the same async core, on the sync bridge."""
        ctx, completion_max = self._context(method, prompt, kwargs)
        fn: Callable[..., Any] = getattr(self.llm, method)

        def blocking() -> Any:
            ctx.used_tokens = None
            try:
                response = fn(prompt, **kwargs)
            except Exception as exc:
                note_error(ctx, exc)
                raise
            ctx.used_tokens = _charged(response, completion_max)
            return response

        return run_sync(lambda: self.pipeline.run(lambda: run_in_worker(blocking), ctx))

    async def astream(self, method: str, prompt: Any, kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """``llm.<method>`` (``astream_chat`` / ``astream_complete``) through the pipeline, each attempt lasting
        until the first chunk: a stream that fails before it is retried, one that breaks later raises
        :class:`~ragguard.StreamInterrupted`."""
        ctx, _ = self._context(method, prompt, kwargs)
        fn: Callable[..., Awaitable[Any]] = getattr(self.llm, method)

        async def attempt() -> tuple[Any, Any]:
            try:
                stream = await fn(prompt, **kwargs)
                try:
                    first = await stream.__anext__()
                except StopAsyncIteration:
                    first = _EMPTY
                except BaseException:
                    await stream.aclose()
                    raise
            except Exception as exc:
                note_error(ctx, exc)
                raise
            return first, stream

        first, stream = await self.pipeline.run(attempt, ctx)
        try:
            async for item in _async_rest(first, stream):
                yield item
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def stream(self, method: str, prompt: Any, kwargs: dict[str, Any]) -> Generator[Any, None, None]:
        """``llm.<method>`` (``stream_chat`` / ``stream_complete``): :meth:`astream`'s rules, on the sync bridge."""
        ctx, _ = self._context(method, prompt, kwargs)
        fn: Callable[..., Any] = getattr(self.llm, method)

        def blocking() -> tuple[Any, Any]:
            try:
                stream = fn(prompt, **kwargs)
                try:
                    first = next(stream)
                except StopIteration:
                    first = _EMPTY
                except BaseException:
                    stream.close()
                    raise
            except Exception as exc:
                note_error(ctx, exc)
                raise
            return first, stream

        first, stream = run_sync(lambda: self.pipeline.run(lambda: run_in_worker(blocking), ctx))
        try:
            yield from _sync_rest(first, stream)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


class GuardedLLM(FunctionCallingLLM):
    """A LlamaIndex LLM with production behaviour; use it wherever the wrapped one was used.

    ``chat``, ``complete``, ``achat``, ``acomplete`` and the streaming variants go through deadline → retry →
    circuit breaker → concurrency limit → rate limit (requests and tokens) → attempt timeout (the slot before the
    permit, so a busy event loop cannot release a backlog of permitted requests at once). Tokens are charged
    at admission as OpenAI counts them (prompt estimate + ``max_tokens``) and settled from the response's
    ``usage``; errors are judged by the OpenAI SDK's classes when the model uses it (429s pause every caller of
    the bucket for the provider's ``Retry-After``). A stream is retried only until its first chunk; one that
    breaks later raises :class:`~ragguard.StreamInterrupted`. Nothing is sent until a stream is iterated, as
    with LlamaIndex's own models.

    The wrapped model's ``metadata`` (context window, chat and function-calling support), prompts and callback
    manager are kept; tool calling (``chat_with_tools``, agents, structured outputs) goes through the guarded
    ``chat`` with the wrapped model's tool formatting. Each attempt calls the wrapped model's public method, so
    its callbacks, instrumentation and LlamaIndex ``rate_limiter`` see every attempt. Its own retries are
    switched off (``max_retries = 0``) so attempts never multiply;
    :class:`~ragguard.integrations.llama_index.InnerRetriesWarning` says when that cannot be done.

    Args:
        llm: any LlamaIndex ``LLM``.
        policy: the guards' configuration; default ``Policy()`` (which reads ``RAGGUARD_*`` variables).
        backend: where shared state lives (default: the process-wide memory backend): every guarded LLM of one
            backend, credential and model shares one rate limit and one breaker.
        estimator: counts a text's tokens for the tokens-per-minute limit (default: :func:`ragguard.default_estimator`).
        clock: time source (tests inject :class:`~ragguard.ManualClock`).
        inner_retries: keep the wrapped model's own retries (default ``False``: switch them off).

    Raises:
        ConfigError: ``llm`` is not a LlamaIndex ``LLM`` or is already guarded.
    """

    _inner: LLM = PrivateAttr()
    _core: _LLMCore = PrivateAttr()

    def __init__(
        self,
        llm: LLM,
        policy: Policy | None = None,
        backend: Backend | None = None,
        *,
        estimator: TokenEstimator | None = None,
        clock: Clock = SYSTEM_CLOCK,
        inner_retries: bool = False,
    ) -> None:
        if not isinstance(llm, LLM):
            raise ConfigError(f"GuardedLLM wraps a llama_index LLM, not {type(llm).__name__}")
        if isinstance(llm, GuardedLLM):
            raise ConfigError("this LLM is guarded already")
        super().__init__(
            system_prompt=llm.system_prompt,
            messages_to_prompt=llm.messages_to_prompt,
            completion_to_prompt=llm.completion_to_prompt,
            output_parser=llm.output_parser,
            pydantic_program_mode=llm.pydantic_program_mode,
            query_wrapper_prompt=llm.query_wrapper_prompt,
            callback_manager=llm.callback_manager,
        )
        if not inner_retries:
            reason = switch_off_retries(llm)
            if reason is not None:
                warn_retries(llm, reason, stacklevel=2)
        self._inner = llm
        self._core = _LLMCore(
            llm,
            policy if policy is not None else Policy(),
            backend if backend is not None else default_backend(),
            estimator=estimator or default_estimator(),
            clock=clock,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "callback_manager":  # LlamaIndex hands its callback manager to Settings.llm: pass it on
            private = getattr(self, "__pydantic_private__", None) or {}
            inner = private.get("_inner")
            if inner is not None:
                inner.callback_manager = value

    @classmethod
    def class_name(cls) -> str:
        return "GuardedLLM"

    @property
    def inner(self) -> LLM:
        """The wrapped model."""
        return self._inner

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._core.policy

    @property
    def metadata(self) -> LLMMetadata:
        return self._inner.metadata

    # calls ---------------------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response: ChatResponse = self._core.call("chat", messages, kwargs)
        return response

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response: ChatResponse = await self._core.acall("achat", messages, kwargs)
        return response

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response: CompletionResponse = self._core.call("complete", prompt, {"formatted": formatted, **kwargs})
        return response

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response: CompletionResponse = await self._core.acall("acomplete", prompt, {"formatted": formatted, **kwargs})
        return response

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._core.stream("stream_chat", messages, kwargs)

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._core.stream("stream_complete", prompt, {"formatted": formatted, **kwargs})

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._core.astream("astream_chat", messages, kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._core.astream("astream_complete", prompt, {"formatted": formatted, **kwargs})

    # tool calling: the wrapped model formats tools and reads tool calls; the call itself goes through chat ---

    def _function_calling(self) -> FunctionCallingLLM:
        inner = self._inner
        if not isinstance(inner, FunctionCallingLLM):
            raise ConfigError(f"{type(inner).__name__} does not support function calling")
        return inner

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return self._function_calling()._prepare_chat_with_tools_compat(
            tools,
            user_msg=user_msg,
            chat_history=chat_history,
            verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls,
            tool_required=tool_required,
            **kwargs,
        )

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        return self._function_calling()._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return self._function_calling().get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs
        )
