"""What ``model.generate`` runs with: the hf backend's logits processors, built from
``SamplingParams``, and the one generation config a call may use (MoTE decodes with both).

Sampling happens here too, so that ``generate`` runs greedy: ``SeededSampler`` draws each
row's token with that row's own ``torch.Generator`` and leaves every other token at -inf.
``generate``'s own sampler draws the whole batch from one global generator, so a
request's text would depend on which other requests share its batch (and a resumed run
would differ from an uninterrupted one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

from selfalign.backends.base import SamplingParams, first_token_bias
from selfalign.backends.ngram import NGramRules, TokenText, apply_rules


class BatchNGramRules(LogitsProcessor):
    """One request's ``NGramRules`` per row. ``input_ids`` are the row's prompt (the part
    after any cached prefix) and then its generated tokens; only the latter are fed."""

    def __init__(self, params: SamplingParams, rows: int, token_text: TokenText) -> None:
        self.rows = [
            NGramRules(params.no_repeat_ngram_size, params.ngram_penalties, token_text)
            for _ in range(rows)
        ]
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]  # the first call comes before any token
        start = self.prompt_len + len(self.rows[0].tokens)
        new = input_ids[:, start:].tolist()
        for rules, tokens in zip(self.rows, new, strict=True):
            rules.feed(tokens)
        return apply_rules(scores, enumerate(self.rows))


class TokenBias(LogitsProcessor):
    """Adds a fixed bias (token -> value) to every row's logits, at every step."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = bias
        self._vector: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._vector is None:
            self._vector = torch.zeros(scores.shape[-1], device=scores.device)
            for token, value in self.bias.items():
                self._vector[token] = value
        return scores + self._vector


class SeededSampler(LogitsProcessor):
    """Draws row ``b``'s next token from the top-p nucleus of softmax(scores[b]) with
    generator ``b`` and masks all other tokens, so a greedy ``generate`` picks exactly the
    drawn token. Goes last, after the temperature warper. ``chooses(input_ids, vocab)``: a
    mask of the rows to draw for (default: all); the other rows' scores pass unchanged
    (MoTE's step grammar forces their token, and a forced token must not use up a draw).

    The nucleus is transformers' ``TopPLogitsWarper``'s (the most likely tokens while the
    mass before each is under ``top_p``), found with ``topk`` over a growing ``k`` instead
    of sorting the vocabulary, and the draw is one uniform number per row through the
    nucleus's cumulative sum. A full sort and a ``multinomial`` per row cost half of
    Gemma's sampled decoding on a CPU (262k tokens), more than the model itself.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        chooses: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        *,
        top_p: float = 1.0,
    ) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.chooses = chooses
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = list(range(len(scores)))
        if self.chooses is not None:
            rows = self.chooses(input_ids, scores.shape[-1]).nonzero().flatten().tolist()
        if not rows:
            return scores
        tokens = draw(torch.softmax(scores[rows].float(), -1), self.top_p,
                      [self.generators[b] for b in rows])  # fmt: skip
        out = scores.clone() if self.chooses is not None else torch.full_like(scores, -torch.inf)
        index = torch.tensor(rows, device=scores.device)
        out[index] = -torch.inf
        out[index, tokens.to(scores.device)] = 0.0
        return out


def nucleus(probs: torch.Tensor, top_p: float, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of each row's top-p nucleus, most likely first, as
    ``(rows, k)`` tensors with zeros past a row's nucleus. ``k`` grows until every row's
    nucleus fits."""
    vocab = probs.shape[-1]
    k = vocab if top_p >= 1.0 else min(k, vocab)
    while True:
        values, ids = probs.topk(k, -1) if k < vocab else probs.sort(-1, descending=True)
        before = values.double().cumsum(-1) - values.double()  # mass ahead of each token
        if k == vocab or bool((before[:, -1] >= top_p).all()):
            return values.double() * (before < top_p), ids
        k = min(4 * k, vocab)


def draw(probs: torch.Tensor, top_p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token id per row of ``probs``, from its top-p nucleus, with that row's generator."""
    if top_p >= 1.0:  # no nucleus to find: the whole vocabulary, in its own order
        weights, ids = probs.double(), None
    else:
        weights, ids = nucleus(probs, top_p)
    cdf = weights.cumsum(-1)  # stays on the device: only the row's uniform number moves
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    u = u.to(cdf.device).unsqueeze(1) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)
    return pick.flatten() if ids is None else ids.gather(1, pick).flatten()


def logits_processors(
    params: SamplingParams,
    seeds: Sequence[int],
    *,
    encode: Callable[[str], list[int]],
    token_text: TokenText,
) -> LogitsProcessorList:
    """Repetition penalty, n-gram rules (on logits before temperature), temperature, the
    logit bias, then the seeded top-p draw (absent when greedy). ``generate`` hands
    them each row's own tokens (after the cached prefix, left pads included) and then its
    generated ones: what the repetition penalty counts."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0 or params.ngram_penalties:
        procs.append(BatchNGramRules(params, len(seeds), token_text))
    if params.temperature > 0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.logit_bias:
        procs.append(TokenBias(first_token_bias(params.logit_bias, encode)))
    if params.temperature > 0:
        procs.append(SeededSampler(seeds, top_p=params.top_p))
    return procs


@contextmanager
def sole_generation_config(config: GenerationConfig, model) -> Iterator[None]:
    """``generate`` fills every option left unset from ``model.generation_config``: a
    checkpoint's sampling settings or repetition penalty (Qwen) would change the output,
    its ``max_length`` (Llama 2) would warn on every call. For the call, ``config`` stands
    in for it (on the transformers model under a PEFT wrapper, which is what runs)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, model.generation_config = model.generation_config, config
    try:
        yield
    finally:
        model.generation_config = saved
