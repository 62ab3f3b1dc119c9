"""A local OpenAI-compatible server over a Hugging Face model, for tests and benchmarks.

    with serve(model_dir, faults=FaultSchedule.uniform(0.2), api_key="sk-test") as server:
        backend = load_backend(BackendConfig(model=server.spec()))

Serves ``/v1/completions`` (string or token-id prompts; stop, seed, temperature, top_p,
max_tokens, logit_bias by token id, logprobs, echo: per-token logprobs of the prompt,
as lm-evaluation-harness reads them), ``/v1/chat/completions`` (the model's chat
template, or a scripted ``chat_handler``) and ``/v1/models``. Generation runs through
``HFBackend`` on one worker thread that batches whatever requests are waiting, like a
continuous-batching server would. Requires the ``dev`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from openai_server.faults import FaultMiddleware, FaultSchedule, TrafficLog
from selfalign.backends.base import (
    BackendStats,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from selfalign.backends.hf import HFBackend
from selfalign.backends.ngram import rules_from_args

ChatHandler = Callable[[list[dict[str, str]], dict[str, Any]], str]


# -- the model side -----------------------------------------------------------------------
@dataclass(frozen=True)
class _IdsRequest(GenerationRequest):
    """A request whose prompt is given as token ids (sent to the model as they are)."""

    ids: tuple[int, ...] = ()


class _ServerHF(HFBackend):
    """HFBackend taking token-id prompts, with automatic prefix caching like vLLM's: a
    block-aligned prefix shared with an earlier prompt is split off and its KV reused."""

    BLOCK = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._known: list[tuple[int, ...]] = []  # shared prefixes seen, most recent first
        self._last: list[int] = []

    def request_ids(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        if isinstance(request, _IdsRequest):
            ids = list(request.ids)
            k = self._shared_len(ids)
            return ids[:k], ids[k:]
        return super().request_ids(request)

    def _shared_len(self, ids: list[int]) -> int:
        for p in self._known:
            if len(p) < len(ids) and tuple(ids[: len(p)]) == p:
                return len(p)
        n = 0
        for a, b in zip(ids, self._last, strict=False):
            if a != b:
                break
            n += 1
        self._last = ids
        k = (min(n, len(ids) - 1) // self.BLOCK) * self.BLOCK
        if k < 2 * self.BLOCK:
            return 0
        self._known.insert(0, tuple(ids[:k]))
        del self._known[8:]
        return k

    @torch.no_grad()
    def token_logprobs(
        self, ids: list[int], top: int
    ) -> tuple[list[float], list[dict[int, float]]]:
        """log P(ids[i] | ids[:i]) for i >= 1, and the ``top`` best alternatives there."""
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], -1)
        target = torch.tensor(ids[1:], device=self.device)
        chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
        alts: list[dict[int, float]] = []
        if top > 0:
            values, idx = logprobs.topk(top, -1)
            alts = [
                dict(zip(i.tolist(), v.tolist(), strict=True))
                for i, v in zip(idx, values, strict=True)
            ]
        return chosen, alts


class _Engine:
    """Owns the model; one worker thread runs all model calls, batching waiting requests."""

    def __init__(self, backend: _ServerHF, max_batch: int) -> None:
        self.backend, self.max_batch = backend, max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="test-server-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        fut: Future = Future()
        self._queue.put(("generate", request, fut))
        return await asyncio.wrap_future(fut)

    async def call(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        self._queue.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if item[0] == "call":
                _settle(item[2], item[1])
                continue
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt[0] != "generate":
                    self._queue.put(nxt)  # handled after this batch
                    break
                batch.append(nxt)
            try:
                results = self.backend.generate([req for _, req, _ in batch])
            except Exception as exc:  # surfaced to each waiting request as a 500
                for _, _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, _, fut), result in zip(batch, results, strict=True):
                fut.set_result(result)


def _settle(fut: Future, fn: Callable[[], Any]) -> None:
    try:
        fut.set_result(fn())
    except Exception as exc:
        fut.set_exception(exc)


# -- the HTTP side ------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float = 1.0
    vllm_xargs: dict[str, Any] | None = None  # the n-gram rules, as our vLLM processor reads
    n: int = 1


class _CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class _ChatBody(_Body):
    messages: list[dict[str, Any]]


class _BadRequest(Exception):
    pass


class _App:
    def __init__(
        self,
        engine: _Engine,
        model_name: str,
        api_key: str | None,
        chat_handler: ChatHandler | None,
        support_echo: bool,
    ) -> None:
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.chat_handler, self.support_echo = chat_handler, support_echo
        self.tok = engine.backend.tokenizer

    def build(self) -> FastAPI:
        app = FastAPI()
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        return app

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        if request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return _error(401, "invalid API key", "invalid_request_error")

    async def models(self, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "selfalign"}],
        }

    def _params(self, body: _Body) -> SamplingParams:
        if body.n != 1:
            raise _BadRequest("only n=1 is supported")
        if body.model != self.model_name:
            raise _BadRequest(f"unknown model {body.model!r}")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        bias: dict[str, float] = {}
        for key, value in (body.logit_bias or {}).items():
            text = self.tok.decode([int(key)])
            # HFBackend biases the first token of a text; accept ids that round-trip.
            if self.engine.backend.encode(text)[:1] != [int(key)]:
                raise _BadRequest(f"logit_bias: token id {key} cannot be biased by this server")
            bias[text] = max(-100.0, min(100.0, value))
        max_tokens = body.max_completion_tokens or body.max_tokens
        try:
            rules = rules_from_args(body.vllm_xargs, None)
        except ValueError as exc:
            raise _BadRequest(f"vllm_xargs: {exc}") from None
        return SamplingParams(
            max_new_tokens=16 if max_tokens is None else max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(stop),
            logit_bias=bias,
            repetition_penalty=body.repetition_penalty,
            no_repeat_ngram_size=rules.no_repeat if rules else 0,
            ngram_penalties=rules.penalties if rules else (),
        )

    async def completions(self, body: _CompletionBody, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        try:
            params = self._params(body)
            prompts = _prompt_list(body.prompt)
            if (body.echo or body.logprobs is not None) and not self.support_echo:
                raise _BadRequest("echo and logprobs are not supported by this server")
            choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
            for index, prompt in enumerate(prompts):
                choice, p_tok, c_tok = await self._complete(prompt, params, body)
                choices.append({"index": index, **choice})
                usage["prompt_tokens"] += p_tok
                usage["completion_tokens"] += c_tok
        except _BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": usage,
        }

    async def _complete(
        self, prompt: str | list[int], params: SamplingParams, body: _CompletionBody
    ) -> tuple[dict[str, Any], int, int]:
        backend = self.engine.backend
        seed = body.seed if body.seed is not None else 0
        ids = backend.head_ids + backend.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = _IdsRequest(prompt="", params=params, seed=seed, ids=tuple(ids))
        if params.max_new_tokens > 0:
            result = await self.engine.generate(request)
        else:
            result = GenerationResult(text="", finish_reason="length")
        choice: dict[str, Any] = {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
        if body.logprobs is not None:
            choice["logprobs"] = await self._logprobs(ids, result.text, body.echo, body.logprobs)
        if body.echo:
            choice["text"] = self.tok.decode(ids, skip_special_tokens=True) + result.text
        return choice, len(ids), result.completion_tokens

    async def _logprobs(
        self, ids: list[int], completion: str, echo: bool, top: int
    ) -> dict[str, Any]:
        """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

        Completion tokens are the completion text re-encoded (exact for greedy output)."""
        gen = self.engine.backend.encode(completion)
        full = ids + gen
        chosen, alts = await self.engine.call(
            lambda: self.engine.backend.token_logprobs(full, top) if len(full) > 1 else ([], [])
        )
        values: list[float | None] = [None, *chosen]
        tops: list[dict[str, float] | None] = [None] + [
            {self.tok.decode([i]): v for i, v in a.items()} for a in alts
        ]
        start = 0 if echo else len(ids)
        prompt_text = self.tok.decode(ids, skip_special_tokens=True) if echo else ""
        offsets, tokens = [], []
        for i in range(start, len(full)):
            if i < len(ids):
                offsets.append(len(self.tok.decode(ids[:i], skip_special_tokens=True)))
            else:
                offsets.append(len(prompt_text) + len(self.tok.decode(gen[: i - len(ids)])))
            tokens.append(self.tok.decode([full[i]]))
        return {
            "tokens": tokens,
            "token_logprobs": values[start:],
            "top_logprobs": tops[start:] if top > 0 else None,
            "text_offset": offsets,
        }

    async def chat(self, body: _ChatBody, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        try:
            params = self._params(body)
        except _BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        messages = [{"role": m["role"], "content": m.get("content") or ""} for m in body.messages]
        if self.chat_handler is not None:
            text = self.chat_handler(messages, body.model_dump())
            result = GenerationResult(text=text, finish_reason="stop")
            prompt_tokens = 0
        else:
            req = GenerationRequest(
                prompt="", params=params, seed=body.seed or 0, messages=tuple(messages)
            )
            result = await self.engine.generate(req)
            prompt_tokens = result.prompt_tokens
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": prompt_tokens + result.completion_tokens,
            },
        }


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise _BadRequest("empty prompt")
    return list(prompt)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status
    )


# -- running it ---------------------------------------------------------------------------
@dataclass
class RunningServer:
    """A started server: where it listens and what it saw."""

    url: str  # base URL for OpenAI clients, ending in /v1
    model_name: str
    traffic: TrafficLog
    model_stats: BackendStats  # the serving model's counters (prefill shows prefix caching)

    def spec(self) -> str:
        """The model spec selfalign configs use for this server."""
        return f"openai:{self.url}#{self.model_name}"


@contextmanager
def serve(
    model: str | Path,
    *,
    model_name: str = "tiny",
    faults: FaultSchedule | None = None,
    api_key: str | None = None,
    chat_handler: ChatHandler | None = None,
    support_echo: bool = True,
    max_batch: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    host: str = "127.0.0.1",
) -> Iterator[RunningServer]:
    """Start the server on a free port in a background thread; stop it on exit."""
    model_backend = _ServerHF(model, batch_size=max_batch, device=device, dtype=dtype)
    engine = _Engine(model_backend, max_batch)
    traffic = TrafficLog()
    app = _App(engine, model_name, api_key, chat_handler, support_echo).build()
    config = uvicorn.Config(
        FaultMiddleware(app, faults, traffic),
        host=host,
        port=0,
        log_level="critical",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-server-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield RunningServer(f"http://{host}:{port}/v1", model_name, traffic, engine.backend.stats)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


__all__ = ["ChatHandler", "FaultSchedule", "RunningServer", "serve"]
