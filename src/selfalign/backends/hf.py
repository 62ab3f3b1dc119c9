"""In-process transformers backend.

Why a decoding loop of our own instead of ``model.generate``:
- a per-request seed (one ``torch.Generator`` per row), so a record's sampled output does
  not depend on which other records share its batch; this is what makes a resumed run
  equal an uninterrupted one;
- a shared prefix (the long in-context prompt) is prefilled once, its KV cache kept and
  expanded to the batch for every later call.
Logit warping still uses transformers' own processors.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StaticCache,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    cut_at_stop,
    first_token_bias,
)
from selfalign.backends.ngram import NGramRules, TokenText, apply_rules, token_texts
from selfalign.errors import InputError

_PREFIX_CACHE_SIZE = 4


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model_and_tokenizer(
    path: str | Path, *, dtype: str = "auto", device: str = "auto", adapter: str | None = None
):
    """``from_pretrained`` exactly as for any Hugging Face model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path)
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(dev).eval()
    return model, tokenizer


class _BatchNGramRules:
    """``NGramRules`` for each row still decoding, as a transformers logits processor
    (rows leave the batch as they finish, so ``step`` drops them)."""

    def __init__(self, params: SamplingParams, rows: int, token_text: TokenText) -> None:
        self.rows = [
            NGramRules(params.no_repeat_ngram_size, params.ngram_penalties, token_text)
            for _ in range(rows)
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return apply_rules(scores, enumerate(self.rows))

    def step(self, tokens: list[int], still: list[int]) -> None:
        """Each active row's new token, then only the rows at positions ``still`` remain."""
        for rules, token in zip(self.rows, tokens, strict=True):
            rules.feed([token])
        self.rows = [self.rows[k] for k in still]


@dataclass
class _Row:
    """One request inside a decoding batch."""

    index: int  # position in the caller's request list
    tokens: list[int]  # fed after the cached prefix
    seed: int
    generated: list[int]
    text: str = ""
    finish_reason: str = "length"  # "stop" once EOS or a stop string appears


class HFBackend(Backend):
    name = "hf"
    can_score = True

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str = "auto",
        adapter: str | None = None,
        model=None,
        tokenizer=None,
    ) -> None:
        super().__init__()
        if model is None:
            model, tokenizer = load_model_and_tokenizer(
                path, dtype=dtype, device=device, adapter=adapter
            )
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_ids = self._eos_ids()
        self.head_ids = self._special_head()
        self.token_text = token_texts(tokenizer)
        self._prefix_caches: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()

    # -- tokenization -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _special_head(self) -> list[int]:
        """The special tokens the tokenizer puts before text (usually BOS), found empirically."""
        with_special = self.tokenizer("a").input_ids
        plain = self.tokenizer("a", add_special_tokens=False).input_ids
        if with_special[len(with_special) - len(plain) :] == plain:
            return with_special[: len(with_special) - len(plain)]
        return []

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        return {i for i in ids if i is not None}

    def request_ids(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        """(shared ids, own ids): the model sees their concatenation."""
        if request.messages is not None:
            ids = self.tokenizer.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [], list(ids)
        if not request.prefix:
            return list(self.head_ids), self.encode(request.prompt)
        # The model sees the tokens of the joined text: tokenized apart, a SentencePiece
        # tokenizer (Llama-2, Mistral) starts the prompt with a word-boundary marker that
        # the joined text never has, and a merge may cross the boundary. The shared part is
        # the run of joined tokens the prefix's own tokens agree with (usually all of them).
        shared = self.head_ids + self.encode(request.prefix)
        joined = self.head_ids + self.encode(request.prefix + request.prompt)
        n = 0
        while n < min(len(shared), len(joined)) and shared[n] == joined[n]:
            n += 1
        return joined[:n], joined[n:]

    # -- prefix cache -------------------------------------------------------------------
    @torch.no_grad()
    def _cached_prefix(self, ids: tuple[int, ...]) -> DynamicCache | None:
        """KV cache of ``ids`` (computed once, kept in a small LRU)."""
        if not ids:
            return None
        if ids in self._prefix_caches:
            self._prefix_caches.move_to_end(ids)
            return self._prefix_caches[ids]
        cache = DynamicCache()
        inp = torch.tensor([ids], device=self.device)
        self.model(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.stats.prefill_tokens += len(ids)
        self._prefix_caches[ids] = cache
        while len(self._prefix_caches) > _PREFIX_CACHE_SIZE:
            self._prefix_caches.popitem(last=False)
        return cache

    def _expanded(self, cached: tuple[int, ...], batch: int) -> DynamicCache:
        """A growable copy of the prefix cache for ``batch`` rows (one forward pass)."""
        cache = self._cached_prefix(cached)
        if cache is None:
            return DynamicCache()
        cache = copy.deepcopy(cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def _decode_cache(self, cached: tuple[int, ...], batch: int, max_len: int) -> StaticCache:
        """A preallocated cache for decoding, seeded with the prefix's keys and values.

        A DynamicCache concatenates the whole KV at every step; with a long shared prefix
        copied to every row, that copying dominates decoding. A static cache writes in place.
        """
        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        prefix = self._cached_prefix(cached)
        if prefix is not None:
            for i, layer in enumerate(prefix.layers):
                keys = layer.keys.expand(batch, -1, -1, -1)
                values = layer.values.expand(batch, -1, -1, -1)
                cache.update(keys, values, i)
        return cache

    @staticmethod
    def _split(shared: list[int], own: list[int]) -> tuple[tuple[int, ...], list[int]]:
        """Cache all shared tokens but the last, so every row feeds at least one token."""
        if len(shared) > 1:
            return tuple(shared[:-1]), shared[-1:] + own
        return (), shared + own

    # -- generation ---------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        work = []
        for i, req in enumerate(requests):
            shared, own = self.request_ids(req)
            cached, tokens = self._split(shared, own)
            work.append((cached, req.params, i, tokens, req.seed))
        # Same prefix and params together; similar lengths together to limit padding.
        work.sort(key=lambda w: (w[0], repr(w[1]), len(w[3])))
        for (cached, params), group in groupby(work, key=lambda w: (w[0], w[1])):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                rows = [_Row(index=i, tokens=t, seed=s, generated=[]) for _, _, i, t, s in chunk]
                self._decode(cached, rows, params)
                for row in rows:
                    results[row.index] = GenerationResult(
                        text=row.text,
                        finish_reason=row.finish_reason,  # type: ignore[arg-type]
                        prompt_tokens=len(cached) + len(row.tokens),
                        completion_tokens=len(row.generated),
                    )
        self.stats.requests += len(requests)
        for r in results:
            self.stats.prompt_tokens += r.prompt_tokens
            self.stats.completion_tokens += r.completion_tokens
        return results  # type: ignore[return-value]

    def _processors(
        self, params: SamplingParams, rows: int
    ) -> tuple[LogitsProcessorList, _BatchNGramRules | None]:
        """The warping chain; the n-gram rules (also returned: they follow the rows) see
        logits after the repetition penalty and before temperature."""
        procs = LogitsProcessorList()
        ngram = None
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.no_repeat_ngram_size > 0 or params.ngram_penalties:
            ngram = _BatchNGramRules(params, rows, self.token_text)
            procs.append(ngram)
        if params.temperature > 0:
            procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
        return procs, ngram

    def _bias(self, params: SamplingParams, vocab: int) -> torch.Tensor | None:
        if not params.logit_bias:
            return None
        bias = torch.zeros(vocab, device=self.device)
        for token, value in first_token_bias(params.logit_bias, self.encode).items():
            bias[token] = value
        return bias

    @torch.no_grad()
    def _decode(self, cached: tuple[int, ...], rows: list[_Row], params: SamplingParams) -> None:
        batch, p = len(rows), len(cached)
        width = max(len(r.tokens) for r in rows)
        # Left-pad each row's own tokens; pads sit between prefix and tokens, masked out.
        inp = torch.full((batch, width), self.pad_id, dtype=torch.long)
        own_mask = torch.zeros((batch, width), dtype=torch.long)
        for b, r in enumerate(rows):
            inp[b, width - len(r.tokens) :] = torch.tensor(r.tokens)
            own_mask[b, width - len(r.tokens) :] = 1
        attn = torch.cat([torch.ones((batch, p), dtype=torch.long), own_mask], 1).to(self.device)
        pos = (p + own_mask.cumsum(1) - 1).clamp(min=p).to(self.device)
        history = inp.to(self.device)  # own tokens + generated, for penalty processors
        cache = self._decode_cache(cached, batch, p + width + params.max_new_tokens)
        out = self.model(
            input_ids=history, attention_mask=attn, position_ids=pos,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        self.stats.prefill_tokens += int(own_mask.sum())
        logits = out.logits[:, -1, :].float()
        procs, ngram = self._processors(params, batch)
        bias = self._bias(params, logits.shape[-1])
        gens = [torch.Generator().manual_seed(r.seed) for r in rows]
        active = list(range(batch))  # rows still decoding, in batch order
        last_pos = pos[:, -1]
        for _step in range(params.max_new_tokens):
            scores = procs(history, logits)
            if bias is not None:
                scores = scores + bias
            if params.temperature > 0:
                probs = torch.softmax(scores, -1).cpu()
                nxt = [
                    int(torch.multinomial(probs[k], 1, generator=gens[b]))
                    for k, b in enumerate(active)
                ]
            else:
                nxt = scores.argmax(-1).tolist()
            still = []
            for k, b in enumerate(active):
                row = rows[b]
                if nxt[k] in self.eos_ids:
                    row.finish_reason = "stop"
                    continue
                row.generated.append(nxt[k])
                if self._hit_stop(row, params.stop):
                    row.finish_reason = "stop"
                    continue
                still.append(k)
            if ngram is not None:
                ngram.step(nxt, still)
            if not still:
                break
            if len(still) < len(active):
                keep = torch.tensor(still, device=self.device)
                cache.reorder_cache(keep)
                attn, history, last_pos = attn[keep], history[keep], last_pos[keep]
                nxt = [nxt[k] for k in still]
                active = [active[k] for k in still]
            step_ids = torch.tensor(nxt, device=self.device)[:, None]
            history = torch.cat([history, step_ids], 1)
            attn = torch.cat([attn, torch.ones_like(step_ids)], 1)
            last_pos = last_pos + 1
            out = self.model(
                input_ids=step_ids, attention_mask=attn, position_ids=last_pos[:, None],
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            logits = out.logits[:, -1, :].float()
        for row in rows:
            row.text = cut_at_stop(
                self.tokenizer.decode(row.generated, skip_special_tokens=True), params.stop
            )

    def _hit_stop(self, row: _Row, stop: Sequence[str]) -> bool:
        """Checked after every token, so a new stop string ends in the newest token: only a
        tail needs decoding (up to 4 tokens a character, plus slack so that a decoder that
        drops the window's leading space cannot hide it). Decoding the whole row each step
        cost ~20% of a 512-token generation."""
        if not stop:
            return False
        window = 4 * max(len(s) for s in stop) + 4
        text = self.tokenizer.decode(row.generated[-window:], skip_special_tokens=True)
        return any(s in text for s in stop)

    # -- scoring ------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's split: trailing context spaces move to the continuation,
        the whole string is tokenized, and the continuation is what follows the context.
        As in lm-eval 0.4.13 (tokenizer defaults), the context starts with the tokenizer's
        own leading special tokens (BOS for Llama/Mistral, none for Qwen)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            first = self.tokenizer.bos_token_id
            return [first if first is not None else self.tokenizer.eos_token_id], self.encode(
                continuation
            )
        # (the openai backend borrows this method and has a tokenizer but no head_ids)
        head = self.head_ids if hasattr(self, "head_ids") else HFBackend._special_head(self)
        whole = head + self.encode(context + continuation)
        ctx = head + self.encode(context)
        return ctx, whole[len(ctx) :]

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """Summed log P(continuation | context); each distinct context is run once."""
        out: list[float] = [0.0] * len(requests)
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, req in enumerate(requests):
            ctx, cont = self.encode_pair(req.context, req.continuation)
            by_context.setdefault(tuple(ctx), []).append((i, cont))
        for ctx, items in by_context.items():
            cached, _ = self._split(list(ctx), [])
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                for (i, _), value in zip(chunk, self._score_chunk(ctx, cached, chunk), strict=True):
                    out[i] = value
        self.stats.requests += len(requests)
        return out

    def _score_chunk(
        self, ctx: tuple[int, ...], cached: tuple[int, ...], chunk: list[tuple[int, list[int]]]
    ) -> list[float]:
        p = len(cached)
        tail = list(ctx[p:])  # the context tokens not in the cache (at least one)
        rows = [tail + cont for _, cont in chunk]
        width = max(len(r) for r in rows)
        inp = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), p + width), dtype=torch.long)
        mask[:, :p] = 1
        for b, r in enumerate(rows):
            inp[b, : len(r)] = torch.tensor(r)
            mask[b, p : p + len(r)] = 1
        pos = torch.arange(p, p + width).expand(len(rows), -1)
        logits = self.model(
            input_ids=inp.to(self.device), attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device), past_key_values=self._expanded(cached, len(rows)),
            use_cache=True,
        ).logits.float()  # fmt: skip
        self.stats.prefill_tokens += sum(len(r) for r in rows)
        logprobs = torch.log_softmax(logits, -1)
        values = []
        for b, (_, cont) in enumerate(chunk):
            start = len(tail) - 1  # position whose logits predict the first continuation token
            idx = torch.arange(start, start + len(cont), device=self.device)
            target = torch.tensor(cont, device=self.device)
            values.append(float(logprobs[b, idx, target].sum()))
        return values
