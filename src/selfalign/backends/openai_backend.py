"""Any OpenAI-compatible server (vLLM serve, llama.cpp, TGI, Ollama, hosted APIs).

Base models go through ``/completions`` (``prefix + prompt`` as one string: the server's
own prefix caching reuses the shared part), chat requests (judges) through
``/chat/completions``. Scoring uses ``echo`` + ``logprobs`` over the prompt, as
lm-evaluation-harness does; servers that cannot do that get a clear error.

Retries and failover between base URLs live in ``retry``. A request that still fails
comes back as ``GenerationResult(finish_reason="error", error=reason)``; the runner keeps
it out of the records so that a resumed run asks again.

The API key is read from the environment variable named in the config and lives only
inside the HTTP clients; anything we report (errors, reasons, repr) is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import openai

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    first_token_bias,
)
from selfalign.backends.ngram import request_args
from selfalign.backends.retry import BadResponse, Endpoint, RequestFailed, RetryingEndpoints
from selfalign.backends.tokens import RequestTokenizer
from selfalign.errors import InputError

T = TypeVar("T")
NO_KEY = "EMPTY"  # what local servers without auth expect (vLLM's convention)


class _LoopThread:
    """A private event loop on a daemon thread, so ``generate`` works from any caller
    (plain scripts, notebooks with a running loop) and the HTTP pool lives across calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="selfalign-openai", daemon=True
        )
        self.thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class OpenAIBackend(Backend):
    name = "openai"
    can_score = True  # where the server supports echo + logprobs; a clear error otherwise

    def __init__(
        self,
        base_urls: list[str],
        model_name: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        retry_backoff_s: float = 1.0,
        tokenizer: str | Path | None = None,
        server_no_repeat_ngram: bool = False,
    ) -> None:
        super().__init__()
        if not base_urls:
            raise InputError("the openai backend needs at least one base URL", field="model")
        self.model_name = model_name
        self.server_no_repeat_ngram = server_no_repeat_ngram
        self.api_key_env = api_key_env
        self._text_prompts_only = False  # set once a server refuses token-id prompts
        # The served model's tokenizer, if given, makes the token ids the hf backend feeds
        # its model; ``encode`` and ``tokenizer`` are what stages read to check bias texts.
        self.tokens = RequestTokenizer(_load_tokenizer(tokenizer)) if tokenizer else None
        self.tokenizer = self.tokens.tokenizer if self.tokens else None
        key = os.environ.get(api_key_env) or NO_KEY
        self._secrets = [key] if key != NO_KEY else []
        self._loop = _LoopThread()
        self._endpoints = [
            Endpoint(
                url,
                openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout_s),
                asyncio.Semaphore(max_concurrency),
            )
            for url in dict.fromkeys(u.rstrip("/") for u in base_urls)
        ]
        self._retrying = RetryingEndpoints(
            self._endpoints,
            self.stats,
            max_retries=max_retries,
            backoff_s=retry_backoff_s,
            api_key_env=api_key_env,
            redact=self._redact,
        )

    def __repr__(self) -> str:
        urls = [e.url for e in self._endpoints]
        return f"OpenAIBackend(base_urls={urls!r}, model={self.model_name!r}, api_key_env={self.api_key_env!r})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` by the served model's tokenizer (biases by text need it)."""
        if self.tokens is None:
            raise InputError(
                "logit_bias is given as text but the OpenAI API wants token ids: set "
                "`tokenizer` in the backend block to the served model's tokenizer directory",
                field="tokenizer",
            )
        return self.tokens.encode(text)

    def close(self) -> None:
        if self._loop.thread.is_alive():

            async def _close() -> None:
                for e in self._endpoints:
                    await e.client.close()

            self._loop.run(_close())
            self._loop.close()

    # -- generation -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        bodies = [self._body(r) for r in requests]  # bad input raises before any traffic

        results = self._loop.run(
            _gather([self._generate_one(r, b) for r, b in zip(requests, bodies, strict=True)])
        )
        self.stats.requests += len(requests)
        for res in results:
            self.stats.prompt_tokens += res.prompt_tokens
            self.stats.completion_tokens += res.completion_tokens
        return results

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        extra: dict[str, Any] = {}
        if p.repetition_penalty != 1.0:  # not OpenAI's, but vLLM, llama.cpp and TGI read it
            extra["repetition_penalty"] = p.repetition_penalty
        ngram = self._ngram_args(p)
        if ngram:
            extra["vllm_xargs"] = ngram
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": request.seed,
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if p.logit_bias:
            body["logit_bias"] = self._token_bias(p)
        if extra:
            body["extra_body"] = extra
        if request.messages is not None:
            body["messages"] = [dict(m) for m in request.messages]
        else:
            body["prompt"] = request.prefix + request.prompt
        return body

    def _ngram_args(self, params: SamplingParams) -> dict[str, Any] | None:
        """The n-gram rules (``no_repeat_ngram_size``, ``ngram_penalties``) for a ``vllm
        serve`` running our logits processor, which applies them exactly as the hf backend
        does (generated tokens only, so the server's own tokenization of the prompt does
        not matter). Any other server cannot: refused before anything is sent."""
        if not (params.no_repeat_ngram_size or params.ngram_penalties):
            return None
        args = request_args(params.no_repeat_ngram_size, params.ngram_penalties)
        if args and not self.server_no_repeat_ngram:
            raise InputError(
                "no_repeat_ngram_size and ngram_penalties are not part of the OpenAI API: "
                "serve the model with `vllm serve ... --logits-processors "
                "selfalign.backends.vllm_logits:NoRepeatNGram` and set "
                "`server_no_repeat_ngram: true`, use the hf or vllm backend, or turn them off",
                field="server_no_repeat_ngram",
            )
        return args

    def _token_bias(self, params: SamplingParams) -> dict[str, float]:
        """Bias by text -> by token id (first token of the text, like the hf backend)."""
        bias = first_token_bias(params.logit_bias, self.encode)
        return {str(k): int(v) if float(v).is_integer() else v for k, v in bias.items()}

    async def _generate_one(
        self, request: GenerationRequest, body: dict[str, Any]
    ) -> GenerationResult:
        is_chat = "messages" in body

        async def call(client: openai.AsyncOpenAI) -> GenerationResult:
            if is_chat:
                resp = await client.chat.completions.create(**body)
            else:
                resp = await client.completions.create(**body)
            choice = _first_choice(resp)
            text = choice.message.content if is_chat else choice.text
            if is_chat and text is None:
                text = ""
            if not isinstance(text, str):
                raise BadResponse("choice has no text")
            usage = getattr(resp, "usage", None)
            return GenerationResult(
                text=text,
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            )

        try:
            return await self._retrying.call(call)
        except RequestFailed as exc:
            return GenerationResult(text="", finish_reason="error", error=str(exc))

    # -- scoring ----------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """Summed log P(continuation | context) from the prompt's echoed logprobs.

        With ``tokenizer`` set, token ids are sent exactly as the hf backend splits them
        (lm-evaluation-harness's context/continuation split), so scores match it; a server
        that takes only text prompts (llama-cpp-python's) gets the text instead. Without
        one, the text is sent and the server tokenizes it (its own BOS included);
        continuation tokens are those reaching past the context in ``text_offset``.

        Servers differ in what they echo: vLLM and our test server list the BOS token,
        llama-cpp-python leaves it out; the one generated token (``max_tokens`` is 1:
        0 means "no limit" to some servers) comes last, or not at all when it was EOS
        and the server does not report it. So the prompt's entries are found from the end
        (all but the ``usage.completion_tokens`` generated ones), never by counting
        ``usage.prompt_tokens`` from the start."""

        return [value for value, _ in self.score_details(requests)]

    def score_details(self, requests: list[ScoreRequest]) -> list[tuple[float, bool | None]]:
        """``score`` plus lm-eval's ``is_greedy``: every continuation token is the most
        likely one in the echoed ``top_logprobs`` (None where the server sends none)."""
        details = self._loop.run(_gather([self._score_one(r) for r in requests]))
        self.stats.requests += len(requests)
        return details

    async def _score_one(self, request: ScoreRequest) -> tuple[float, bool | None]:
        context, continuation = _move_trailing_spaces(request.context, request.continuation)
        if self.tokens is not None and not self._text_prompts_only:
            ctx_ids, cont_ids = self.tokens.encode_pair(context, continuation)
            prompt: str | list[int] = ctx_ids + cont_ids
        else:
            prompt = context + continuation
        body = {
            "model": self.model_name, "prompt": prompt, "echo": True, "logprobs": 1,
            "max_tokens": 1, "temperature": 0.0,
        }  # fmt: skip

        async def call(client: openai.AsyncOpenAI) -> tuple[float, bool | None]:
            try:
                resp = await client.completions.create(**body)
            except openai.APIStatusError as exc:
                # llama-cpp-python answers a token-id prompt with 500 "validation errors".
                refused = exc.status_code in (400, 422, 500) and "prompt" in str(exc)
                if isinstance(prompt, list) and refused:
                    raise _IdsRefused from None
                if exc.status_code in (400, 422):
                    raise InputError(self._no_echo(str(exc)), field="model") from None
                raise
            choice = _first_choice(resp)
            lp = getattr(choice, "logprobs", None)
            values = getattr(lp, "token_logprobs", None)
            if not values:
                raise InputError(self._no_echo("the response carries no logprobs"), field="model")
            usage = getattr(resp, "usage", None)
            self.stats.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
            n_echoed = _echoed_prompt_len(len(values), usage)
            if n_echoed is None:
                raise InputError(self._no_echo("no usage to locate the prompt"), field="model")
            if isinstance(prompt, list):
                picked = values[n_echoed - len(cont_ids) : n_echoed]
                if n_echoed - len(cont_ids) < 1:
                    raise InputError(self._no_echo("the echoed prompt is too short"), field="model")
            else:
                picked = _past_context(lp, n_echoed, len(prompt), len(context))
                if picked is None:
                    raise InputError(self._no_echo("no text_offset to locate it"), field="model")
            if not picked or any(v is None for v in picked):
                raise BadResponse("missing logprobs for continuation tokens")
            return float(sum(picked)), _greedy(lp, n_echoed, len(picked))

        try:
            return await self._retrying.call(call)
        except _IdsRefused:
            self._text_prompts_only = True  # later requests send text at once
            return await self._score_one(request)

    def _no_echo(self, detail: str) -> str:
        return self._redact(
            f"scoring needs a server that returns prompt logprobs (echo + logprobs on "
            f"/completions, as vLLM does); {self._endpoints[0].url} does not: {detail[:200]}. "
            f"Use the hf or vllm backend for this stage"
        )

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


class _IdsRefused(Exception):
    """The server refused a token-id prompt (llama-cpp-python takes text only)."""


def _echoed_prompt_len(n_entries: int, usage: Any) -> int | None:
    """How many leading logprob entries are the echoed prompt: all but the generated ones."""
    generated = getattr(usage, "completion_tokens", None)
    if not isinstance(generated, int) or not 0 <= generated < n_entries:
        return None
    return n_entries - generated


def _past_context(
    logprobs: Any, n_echoed: int, prompt_len: int, context_len: int
) -> list[float | None] | None:
    """Logprobs of the echoed prompt's tokens whose text reaches past the context.

    ``text_offset`` is read relative to where the prompt ends (the generated token's
    offset, else the end of the last prompt token): a BOS entry whose text some servers
    count in the offsets then shifts nothing."""
    offsets = getattr(logprobs, "text_offset", None)
    tokens = getattr(logprobs, "tokens", None) or []
    values = logprobs.token_logprobs
    if not offsets or len(offsets) != len(values):
        return None
    if n_echoed < len(offsets):
        prompt_end = offsets[n_echoed]
    elif len(tokens) == len(values):
        prompt_end = offsets[n_echoed - 1] + len(tokens[n_echoed - 1])
    else:
        return None
    context_end = prompt_end - prompt_len + context_len
    ends = [*offsets[1:n_echoed], prompt_end]
    return [v for v, end in zip(values[:n_echoed], ends, strict=True) if end > context_end]


def _greedy(logprobs: Any, n_echoed: int, n_picked: int) -> bool | None:
    """Whether each of the last ``n_picked`` echoed prompt tokens has the highest logprob
    at its position (``top_logprobs``, asked for with ``logprobs: 1``); None without them."""
    tops = getattr(logprobs, "top_logprobs", None)
    if not tops or len(tops) < n_echoed:
        return None
    span = slice(n_echoed - n_picked, n_echoed)
    for value, top in zip(logprobs.token_logprobs[span], tops[span], strict=True):
        if not top or value is None:
            return None
        if value < max(top.values()):
            return False
    return True


async def _gather(coros: list[Awaitable[T]]) -> list[T]:
    """All results in order; the first exception (if any) is raised after all finish."""
    out = await asyncio.gather(*coros, return_exceptions=True)
    for item in out:
        if isinstance(item, BaseException):
            raise item
    return out  # type: ignore[return-value]


def _first_choice(resp: Any) -> Any:
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise BadResponse("response has no choices")
    return choices[0]


def _move_trailing_spaces(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness: trailing context spaces belong to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise InputError("tokenizer directory does not exist", file=p, field="tokenizer")
    return AutoTokenizer.from_pretrained(p)
