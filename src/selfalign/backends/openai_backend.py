"""Any OpenAI-compatible server (vLLM serve, llama.cpp, TGI, Ollama, hosted APIs).

Base models go through ``/completions`` (``prefix + prompt`` as one string: the server's
own prefix caching reuses the shared part), chat requests (judges) through
``/chat/completions``. Scoring uses ``echo`` + ``logprobs`` over the prompt, as
lm-evaluation-harness does; servers that cannot do that get a clear error.

Retries are ours, not the client's (``max_retries=0``): that way every retry is counted
by reason in ``stats.retry_reasons``, a malformed JSON body (which the client raises as
a bare ``JSONDecodeError``) is retried like a 5xx, and the wait honours ``Retry-After``
with exponential backoff and full jitter otherwise. A request that still fails comes
back as ``GenerationResult(finish_reason="error", error=reason)``; the runner keeps it
out of the records so that a resumed run asks again.

The API key is read from the environment variable named in the config and lives only
inside the HTTP clients; anything we report (errors, reasons, repr) is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
import pydantic

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    first_token_bias,
)
from selfalign.backends.hf import HFBackend
from selfalign.backends.ngram import request_args
from selfalign.errors import InputError

T = TypeVar("T")
MAX_BACKOFF_S = 30.0
NO_KEY = "EMPTY"  # what local servers without auth expect (vLLM's convention)


class RequestFailed(RuntimeError):
    """A score request failed after all retries (scores have no per-item error slot)."""


class _BadResponse(Exception):
    """The server answered 200 with something that is not a usable completion."""


@dataclass
class _Endpoint:
    url: str
    client: openai.AsyncOpenAI
    slots: asyncio.Semaphore
    assigned: int = 0  # requests routed here and not finished yet


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

    # With ``tokenizer`` set, HFBackend's tokenization code (it needs only ``tokenizer``,
    # ``encode`` and ``head_ids``) gives the same ids the hf backend feeds its model.
    encode = HFBackend.encode
    encode_pair = HFBackend.encode_pair
    _special_head = HFBackend._special_head

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
        self.max_retries, self.retry_backoff_s = max_retries, retry_backoff_s
        self.tokenizer = _load_tokenizer(tokenizer) if tokenizer else None
        self.head_ids = self._special_head() if self.tokenizer is not None else []
        key = os.environ.get(api_key_env) or NO_KEY
        self._secrets = [key] if key != NO_KEY else []
        self._rng = random.Random()
        self._loop = _LoopThread()
        self._endpoints = [
            _Endpoint(
                url,
                openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout_s),
                asyncio.Semaphore(max_concurrency),
            )
            for url in dict.fromkeys(u.rstrip("/") for u in base_urls)
        ]
        self._turn = 0

    def __repr__(self) -> str:
        urls = [e.url for e in self._endpoints]
        return f"OpenAIBackend(base_urls={urls!r}, model={self.model_name!r}, api_key_env={self.api_key_env!r})"

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
        if self.tokenizer is None:
            raise InputError(
                "logit_bias is given as text but the OpenAI API wants token ids: set "
                "`tokenizer` in the backend block to the served model's tokenizer directory",
                field="tokenizer",
            )
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
                raise _BadResponse("choice has no text")
            usage = getattr(resp, "usage", None)
            return GenerationResult(
                text=text,
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            )

        try:
            return await self._with_retries(call)
        except RequestFailed as exc:
            return GenerationResult(text="", finish_reason="error", error=str(exc))

    # -- scoring ----------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """Summed log P(continuation | context) from the prompt's echoed logprobs.

        With ``tokenizer`` set, token ids are sent exactly as the hf backend splits them
        (lm-evaluation-harness's context/continuation split), so scores match it.
        Without one, the text is sent and the server tokenizes it (its own BOS included);
        continuation tokens are those reaching past the context in ``text_offset``."""

        values = self._loop.run(_gather([self._score_one(r) for r in requests]))
        self.stats.requests += len(requests)
        return values

    async def _score_one(self, request: ScoreRequest) -> float:
        context, continuation = _move_trailing_spaces(request.context, request.continuation)
        if self.tokenizer is not None:
            ctx_ids, cont_ids = self.encode_pair(context, continuation)
            prompt: str | list[int] = ctx_ids + cont_ids
        else:
            prompt = context + continuation
        body = {
            "model": self.model_name, "prompt": prompt, "echo": True, "logprobs": 1,
            "max_tokens": 1, "temperature": 0.0,
        }  # fmt: skip

        async def call(client: openai.AsyncOpenAI) -> float:
            try:
                resp = await client.completions.create(**body)
            except openai.BadRequestError as exc:
                raise InputError(self._no_echo(str(exc)), field="model") from None
            choice = _first_choice(resp)
            lp = getattr(choice, "logprobs", None)
            values = getattr(lp, "token_logprobs", None)
            if not values:
                raise InputError(self._no_echo("the response carries no logprobs"), field="model")
            usage = getattr(resp, "usage", None)
            self.stats.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
            if isinstance(prompt, list):
                picked = values[len(ctx_ids) : len(prompt)]
                if len(picked) != len(cont_ids):
                    raise InputError(self._no_echo("the echoed prompt is too short"), field="model")
            else:
                offsets = getattr(lp, "text_offset", None)
                n_prompt = getattr(usage, "prompt_tokens", None)
                if not offsets or not n_prompt:
                    raise InputError(
                        self._no_echo("no text_offset/usage to locate the prompt"), field="model"
                    )
                ends = [*offsets[1:n_prompt], len(prompt)]
                picked = [
                    v for v, end in zip(values[:n_prompt], ends, strict=True) if end > len(context)
                ]
            if not picked or any(v is None for v in picked):
                raise _BadResponse("missing logprobs for continuation tokens")
            return float(sum(picked))

        return await self._with_retries(call)

    def _no_echo(self, detail: str) -> str:
        return self._redact(
            f"scoring needs a server that returns prompt logprobs (echo + logprobs on "
            f"/completions, as vLLM does); {self._endpoints[0].url} does not: {detail[:200]}. "
            f"Use the hf or vllm backend for this stage"
        )

    # -- retries ----------------------------------------------------------------------------
    async def _with_retries(self, call: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
        attempt, last = 0, None
        while True:
            endpoint = self._pick(avoid=last)
            endpoint.assigned += 1
            try:
                async with endpoint.slots:
                    return await call(endpoint.client)
            except Exception as exc:
                reason, retry, wait_hint = self._classify(exc, endpoint)
            finally:
                endpoint.assigned -= 1
            if not retry or attempt >= self.max_retries:
                self.stats.failures += 1
                raise RequestFailed(reason if not retry else f"{reason} (after {attempt} retries)")
            attempt += 1
            tag = reason.split(":")[0]
            self.stats.retries += 1
            self.stats.retry_reasons[tag] = self.stats.retry_reasons.get(tag, 0) + 1
            last = endpoint
            await asyncio.sleep(self._backoff(attempt, wait_hint))

    def _pick(self, avoid: _Endpoint | None) -> _Endpoint:
        """The endpoint with the least work; on a retry, another one if there is one."""
        pool = [e for e in self._endpoints if e is not avoid] or self._endpoints
        self._turn += 1
        n = len(pool)
        return min((pool[(self._turn + i) % n] for i in range(n)), key=lambda e: e.assigned)

    def _backoff(self, attempt: int, hint: float | None) -> float:
        ceiling = min(MAX_BACKOFF_S, self.retry_backoff_s * 2 ** (attempt - 1))
        wait = self._rng.uniform(0, ceiling)  # full jitter
        return max(wait, min(hint, MAX_BACKOFF_S)) if hint is not None else wait

    def _classify(self, exc: Exception, endpoint: _Endpoint) -> tuple[str, bool, float | None]:
        """(reason, retry?, server's wait hint). Raises for errors no retry can fix."""
        if isinstance(exc, InputError):
            raise exc
        if isinstance(exc, openai.APITimeoutError):
            return "timeout", True, None
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return (
                f"connection: {self._redact(type(cause).__name__ + ': ' + str(cause))[:200]}",
                True,
                None,
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = self._redact(str(getattr(exc, "message", "") or exc))[:300]
            if status in (401, 403):
                raise InputError(
                    f"{endpoint.url} refused the request ({status}): check the API key in "
                    f"${self.api_key_env}",
                    field="api_key_env",
                ) from None
            if status == 404:
                raise InputError(f"{endpoint.url}: {message}", field="model") from None
            retry = status in (408, 409, 429) or status >= 500
            return f"http_{status}: {message}", retry, _retry_after(exc.response) if retry else None
        if isinstance(
            exc,
            json.JSONDecodeError
            | pydantic.ValidationError
            | _BadResponse
            | openai.APIResponseValidationError,
        ):
            return f"bad_response: {self._redact(str(exc))[:200]}", True, None
        raise exc  # a bug on our side, not a server fault: let it surface

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


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
        raise _BadResponse("response has no choices")
    return choices[0]


def _retry_after(response: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (numeric form)."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            continue
    return None


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
