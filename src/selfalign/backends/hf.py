"""In-process transformers backend: ``model.generate`` with three things of our own.

- A shared prefix (the long in-context prompt) is prefilled once, its KV cache kept and
  copied into the static cache ``generate`` decodes with, for every later batch.
- A per-request seed: sampling is a logits processor (``sampling.SeededSampler``) with
  one ``torch.Generator`` per row, ``generate`` itself runs greedy. A record's sampled
  output does not depend on which other records share its batch; this is what makes a
  resumed run equal an uninterrupted one.
- Stop strings are transformers' ``StopStringCriteria`` over the generated tokens only;
  the text is cut at the first one (``cut_at_stop``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    cut_at_stop,
)
from selfalign.backends.ngram import token_texts
from selfalign.backends.sampling import logits_processors, sole_generation_config
from selfalign.backends.tokens import RequestTokenizer
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


def _cache_kwarg() -> str:
    """The name models take their KV cache under: ``cache`` since transformers renamed it
    (5.2x; ``past_key_values`` is then deprecated), ``past_key_values`` before. An unknown
    keyword is swallowed by ``**kwargs``, so the wrong name would silently drop the cache."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaModel

    return (
        "cache"
        if "cache" in inspect.signature(LlamaModel.forward).parameters
        else ("past_key_values")
    )


CACHE_KWARG = _cache_kwarg()


def load_model_and_tokenizer(
    path: str | Path, *, dtype: str = "auto", device: str = "auto", adapter: str | None = None
):
    """``from_pretrained`` exactly as for any Hugging Face model directory. An adapter
    folder that carries a tokenizer (ours do: the chat template it was trained with, its
    end-of-turn token) supplies the tokenizer."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path)
    dev = resolve_device(device)
    own = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter if own else path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(dev).eval()
    return model, tokenizer


class _StopStrings(StoppingCriteria):
    """A ``StopStringCriteria`` over the generated tokens only (as ``cut_at_stop`` reads
    them: a stop string begun in the prompt does not count), remembering how many tokens
    each row had when its first stop string appeared."""

    def __init__(self, criteria: StopStringCriteria, prompt_len: int) -> None:
        self.criteria = criteria
        self.prompt_len = prompt_len
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self.criteria(input_ids[:, self.prompt_len :], scores)
        for b in done.nonzero()[:, 0].tolist():
            self.lengths.setdefault(b, input_ids.shape[1] - self.prompt_len)
        return done


@dataclass
class _Row:
    """One request inside a decoding batch."""

    index: int  # position in the caller's request list
    tokens: list[int]  # fed after the cached prefix
    seed: int
    generated: list[int] = field(default_factory=list)
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
        self.tokens = RequestTokenizer(tokenizer)
        self.eos_ids = self._eos_ids()
        self.token_text = token_texts(tokenizer)
        self._prefix_caches: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()
        # Built once per stop set: it indexes the whole vocabulary (0.6 s for Gemma's 262k
        # tokens even when transformers' own cache has it).
        self._stop_criteria = lru_cache(maxsize=8)(
            lambda stop: StopStringCriteria(tokenizer, list(stop))
        )

    # -- tokenization (a ``RequestTokenizer``, shared with the other backends) ----------
    @property
    def head_ids(self) -> list[int]:
        return self.tokens.head_ids

    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def request_ids(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        """(shared ids, own ids): the model sees their concatenation."""
        return self.tokens.request_ids(request)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's context/continuation split (see ``RequestTokenizer``)."""
        return self.tokens.encode_pair(context, continuation)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        return {i for i in ids if i is not None}

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
        self.model(input_ids=inp, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
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
                rows = [_Row(index=i, tokens=t, seed=s) for _, _, i, t, s in chunk]
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

    @torch.no_grad()
    def _decode(self, cached: tuple[int, ...], rows: list[_Row], params: SamplingParams) -> None:
        """``model.generate`` from the prefix's cache; each row's own tokens are left-padded
        (pads sit between prefix and tokens, masked out) and positioned after the prefix."""
        if params.max_new_tokens < 1:  # generate() refuses it; the rows stay empty
            return
        batch, p = len(rows), len(cached)
        width = max(len(r.tokens) for r in rows)
        inp = torch.full((batch, width), self.pad_id, dtype=torch.long)
        own_mask = torch.zeros((batch, width), dtype=torch.long)
        for b, r in enumerate(rows):
            inp[b, width - len(r.tokens) :] = torch.tensor(r.tokens)
            own_mask[b, width - len(r.tokens) :] = 1
        attn = torch.cat([torch.ones((batch, p), dtype=torch.long), own_mask], 1)
        pos = (p + own_mask.cumsum(1) - 1).clamp(min=p)
        stops = _StopStrings(self._stop_criteria(params.stop), width) if params.stop else None
        # Greedy: any sampling is done by the processors. No automatic torch.compile
        # (a static cache would trigger it on a GPU, and every batch shape compile anew).
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, disable_compile=True,
            eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id,
        )  # fmt: skip
        with sole_generation_config(config, self.model):
            out = self.model.generate(
                inp.to(self.device), attention_mask=attn.to(self.device),
                position_ids=pos.to(self.device),
                **{CACHE_KWARG: self._decode_cache(cached, batch, p + width + params.max_new_tokens)},
                generation_config=config,
                logits_processor=logits_processors(
                    params, [r.seed for r in rows], encode=self.encode, token_text=self.token_text
                ),
                stopping_criteria=StoppingCriteriaList([stops] if stops else []),
            )  # fmt: skip
        self.stats.prefill_tokens += int(own_mask.sum())
        for b, (row, generated) in enumerate(zip(rows, out[:, width:].tolist(), strict=True)):
            if stops is not None and b in stops.lengths:
                generated = generated[: stops.lengths[b]]
                row.finish_reason = "stop"
            for k, token in enumerate(generated):
                if token in self.eos_ids:
                    generated, row.finish_reason = generated[:k], "stop"
                    break
            row.generated = generated
            row.text = cut_at_stop(
                self.tokenizer.decode(generated, skip_special_tokens=True), params.stop
            )

    # -- scoring ------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """Summed log P(continuation | context); each distinct context is run once."""
        return [value for value, _ in self.score_details(requests)]

    def score_details(self, requests: list[ScoreRequest]) -> list[tuple[float, bool | None]]:
        """(summed log-likelihood, whether greedy decoding writes the continuation)."""
        return self.score_ids([self.encode_pair(r.context, r.continuation) for r in requests])

    @torch.no_grad()
    def score_ids(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool | None]]:
        """``score_details`` on token ids: (context ids, leading special tokens included;
        continuation ids). Each distinct context is run once."""
        out: list[tuple[float, bool | None]] = [(0.0, True)] * len(pairs)
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), []).append((i, list(cont)))
        for ctx, items in by_context.items():
            cached, _ = self._split(list(ctx), [])
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                for (i, _), value in zip(chunk, self._score_chunk(ctx, cached, chunk), strict=True):
                    out[i] = value
        self.stats.requests += len(pairs)
        return out

    def _score_chunk(
        self, ctx: tuple[int, ...], cached: tuple[int, ...], chunk: list[tuple[int, list[int]]]
    ) -> list[tuple[float, bool]]:
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
            position_ids=pos.to(self.device), **{CACHE_KWARG: self._expanded(cached, len(rows))},
            use_cache=True,
        ).logits.float()  # fmt: skip
        self.stats.prefill_tokens += sum(len(r) for r in rows)
        logprobs = torch.log_softmax(logits, -1)
        values = []
        for b, (_, cont) in enumerate(chunk):
            start = len(tail) - 1  # position whose logits predict the first continuation token
            idx = torch.arange(start, start + len(cont), device=self.device)
            target = torch.tensor(cont, device=self.device)
            greedy = bool((logprobs[b, idx].argmax(-1) == target).all())
            values.append((float(logprobs[b, idx, target].sum()), greedy))
        return values
