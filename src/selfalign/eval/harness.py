"""lm-evaluation-harness's model interface over any selfalign ``Backend``.

``BackendLM`` is an ``lm_eval.api.model.LM``: ``loglikelihood`` goes to ``score_details``
(the hf backend's prefix cache runs each shared context once), ``generate_until`` to
``generate`` and ``loglikelihood_rolling`` to the score of the whole text after the BOS
token (the hf backend splits a text longer than the model's context into lm-eval's
rolling windows; other backends send it whole).

Every answer is kept in a JSONL of records keyed by a hash of the model, the request kind
and its arguments, appended chunk by chunk: a killed run, run again, asks the backend only
for what is missing. Requests are cut into chunks over the whole request list (whole
contexts together), so a resumed run sends the same batches as an uninterrupted one.

Only imported where lm_eval is installed (the ``lm-eval`` extra).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM

from selfalign.backends.base import Backend, GenerationRequest, SamplingParams, ScoreRequest
from selfalign.backends.retry import RequestFailed
from selfalign.errors import InputError
from selfalign.eval.resume import load_done
from selfalign.progress import ProgressReporter

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default context when neither config nor tokenizer says
# Generation settings we pass on; the others (top_k, ...) only matter when sampling.
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}

Work = Callable[[list[str]], list[dict[str, Any] | None]]


class RequestsFailed(RuntimeError):
    """Requests failed after the backend's retries; what finished is in the records."""

    def __init__(self, n: int) -> None:
        super().__init__(f"{n} request(s) failed")
        self.n = n


def request_id(model: str, kind: str, *parts: Any) -> str:
    data = json.dumps([model, kind, *parts], ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:32]


def sampling_params(gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
    """A task's ``generation_kwargs`` -> our params (+ the names we could not honour).

    As lm-eval's HFLM: ``until`` (a string or list) are stop strings, ``max_gen_toks``
    defaults to 256, decoding is greedy unless ``do_sample`` (then ``temperature``
    defaults to 1)."""
    kw = dict(gen_kwargs)
    until = kw.get("until") or []
    stop = (until,) if isinstance(until, str) else tuple(until)
    sample = bool(kw.get("do_sample", False))
    temperature = float(kw.get("temperature", 1.0)) if sample else 0.0
    params = SamplingParams(
        max_new_tokens=int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        temperature=temperature,
        top_p=float(kw.get("top_p", 1.0)) if temperature > 0 else 1.0,
        stop=stop,
    )
    ignored = sorted(k for k in kw if k not in _GEN_KEYS) if temperature > 0 else []
    return params, ignored


def context_chunks(order: Sequence[str], context_of: dict[str, str], size: int) -> list[list[str]]:
    """``order`` (ids, grouped by context) cut into chunks of whole contexts, a new chunk
    once ``size`` ids are reached."""
    chunks: list[list[str]] = []
    current: list[str] = []
    for i, rid in enumerate(order):
        current.append(rid)
        last = i + 1 == len(order) or context_of[order[i + 1]] != context_of[rid]
        if last and len(current) >= size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def max_length_of(backend: Backend) -> int | None:
    """The model's context length where the backend holds the model (hf), as lm-eval's
    ``resolve_max_length`` reads it; None for servers."""
    model = getattr(backend, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = getattr(config, "text_config", None)
    for cfg in (text, config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    tokenizer = getattr(backend, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else DEFAULT_MAX_LENGTH


class BackendLM(LM):
    """An ``lm_eval`` model over one of our backends (see the module docstring).

    ``model_id`` goes into every record id (``model_identity`` of the spec), so a records
    file never answers for another model; ``seed`` seeds sampled generations (each request
    its own seed, derived from its id); ``max_length`` overrides the model's context
    length for rolling windows."""

    def __init__(
        self,
        backend: Backend,
        *,
        model_id: str,
        records: Path | None = None,
        seed: int = 0,
        chunk_size: int = 128,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.backend, self.model_id = backend, model_id
        self.seed, self.chunk_size = seed, chunk_size
        self.max_length = max_length or max_length_of(backend)
        self._log, self._done = load_done(records)
        self.computed: Counter[str] = Counter()  # requests sent to the backend, by kind
        self.reused: Counter[str] = Counter()  # requests answered from the records
        self.greedy_known = True  # False once the backend could not tell is_greedy
        self._warned: set[str] = set()

    # -- lm-eval's three request kinds ----------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        args = [(str(r.args[0]), str(r.args[1])) for r in requests]
        ids = [request_id(self.model_id, "loglikelihood", *a) for a in args]
        first = dict(zip(ids, args, strict=True))  # one request per distinct pair
        context_of = {rid: a[0] for rid, a in first.items()}
        by_context: dict[str, list[str]] = {}
        for rid, (ctx, _) in first.items():
            by_context.setdefault(ctx, []).append(rid)
        order = [rid for group in by_context.values() for rid in group]

        def work(chunk: list[str]) -> list[dict[str, Any] | None]:
            reqs = [ScoreRequest(*first[rid]) for rid in chunk]
            try:
                details = self.backend.score_details(reqs)
            except RequestFailed:
                return [None] * len(chunk)
            return [{"ll": v, "greedy": g} for v, g in details]

        self._run("loglikelihood", context_chunks(order, context_of, self.chunk_size), work)
        out = []
        for rid in ids:
            rec = self._done[rid]
            if rec["greedy"] is None:
                self.greedy_known = False
            out.append((float(rec["ll"]), bool(rec["greedy"])))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        texts = [str(r.args[0]) for r in requests]
        ids = [request_id(self.model_id, "loglikelihood_rolling", t) for t in texts]
        text_of = dict(zip(ids, texts, strict=True))
        order = list(text_of)

        def work(chunk: list[str]) -> list[dict[str, Any] | None]:
            try:
                return [{"ll": v} for v in self._rolling([text_of[rid] for rid in chunk])]
            except RequestFailed:
                return [None] * len(chunk)

        chunks = [order[i : i + self.chunk_size] for i in range(0, len(order), self.chunk_size)]
        self._run("loglikelihood_rolling", chunks, work)
        return [float(self._done[rid]["ll"]) for rid in ids]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        seen: Counter[tuple[str, str]] = Counter()
        ids, asked = [], {}
        for r in requests:
            context, gen_kwargs = str(r.args[0]), dict(r.args[1])
            params, ignored = sampling_params(gen_kwargs)
            for key in ignored:
                self._warn(f"generation setting {key!r} is not supported and is ignored")
            kwargs = json.dumps(gen_kwargs, sort_keys=True, default=str)
            if params.temperature > 0:  # repeats of a sampled request are distinct samples
                copy = seen[(context, kwargs)]
                seen[(context, kwargs)] += 1
                rid = request_id(self.model_id, "generate_until", context, kwargs, self.seed, copy)
            else:
                rid = request_id(self.model_id, "generate_until", context, kwargs)
            ids.append(rid)
            asked[rid] = GenerationRequest(prompt=context, params=params, seed=int(rid[:7], 16))
        order = list(asked)

        def work(chunk: list[str]) -> list[dict[str, Any] | None]:
            results = self.backend.generate([asked[rid] for rid in chunk])
            return [None if r.error else {"text": r.text} for r in results]

        chunks = [order[i : i + self.chunk_size] for i in range(0, len(order), self.chunk_size)]
        self._run("generate_until", chunks, work)
        return [str(self._done[rid]["text"]) for rid in ids]

    # -- chat templates (``--apply-chat-template``) ----------------------------------------
    def _chat_tokenizer(self) -> Any:
        tokenizer = getattr(self.backend, "tokenizer", None)
        if self.backend.name == "mote" or not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"the {self.backend.name} backend has no chat template to apply here (a MoTE "
                "model always answers in its own chat format)",
                field="--apply-chat-template",
            )
        return tokenizer

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat rendered as text by the model's template, as lm-eval's HFLM does;
        a leading BOS is dropped, since the backends put it before every prompt."""
        from selfalign.train.template import render_chat

        return render_chat(
            self._chat_tokenizer(), chat_history, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )  # fmt: skip

    @property
    def tokenizer_name(self) -> str:
        return str(self._chat_tokenizer().name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._chat_tokenizer().chat_template if chat_template else None

    # -- helpers ----------------------------------------------------------------------------
    def _rolling(self, texts: list[str]) -> list[float]:
        """Whole-text log-likelihoods after BOS. The hf backend cuts a long text into
        lm-eval's disjoint rolling windows (each token predicted once, with as much
        context as fits); a server gets the text in one request."""
        score_ids = getattr(self.backend, "score_ids", None)
        max_length = self.max_length
        if score_ids is None or max_length is None:
            return [v for v, _ in self.backend.score_details([ScoreRequest("", t) for t in texts])]
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tokenizer = self.backend.tokenizer  # type: ignore[attr-defined]
        prefix = tokenizer.bos_token_id
        prefix = tokenizer.eos_token_id if prefix is None else prefix
        windows: list[tuple[int, tuple[list[int], list[int]]]] = []
        for k, text in enumerate(texts):
            tokens = self.backend.encode(text)  # type: ignore[attr-defined]
            for pair in get_rolling_token_windows(tokens, prefix, max_length, 1):
                windows.append((k, make_disjoint_window(pair)))
        totals = [0.0] * len(texts)
        for (k, _), (value, _) in zip(windows, score_ids([w for _, w in windows]), strict=True):
            totals[k] += value
        return totals

    def _run(self, kind: str, chunks: list[list[str]], work: Work) -> None:
        """Answer every id not in the records, chunk by chunk, appending each chunk's records."""
        total = sum(map(len, chunks))
        pending = [[rid for rid in chunk if rid not in self._done] for chunk in chunks]
        left = sum(map(len, pending))
        self.reused[kind] += total - left
        failed = 0
        with ProgressReporter(f"lm-eval {kind}", total=total, done=total - left) as progress:
            for chunk in filter(None, pending):
                fresh = []
                for rid, rec in zip(chunk, work(chunk), strict=True):
                    if rec is None:
                        failed += 1
                        continue
                    rec = {"id": rid, **rec}
                    self._done[rid] = rec
                    fresh.append(rec)
                if self._log is not None:
                    self._log.append(fresh)
                self.computed[kind] += len(fresh)
                progress.advance(len(chunk))
        if failed:
            raise RequestsFailed(failed)

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"warning: {message}", file=sys.stderr)
