"""No-repeat-n-gram blocking for engines that apply one request at a time (vLLM).

Same rule as transformers' ``NoRepeatNGramLogitsProcessor`` over the tokens the hf
backend feeds it: the request's own prompt tokens (the shared prefix is not counted)
followed by the tokens generated so far. A token that would complete an n-gram already
seen in that sequence gets -inf. The index grows incrementally, so a step costs O(1)
n-gram insertions instead of a rescan of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Per-request switches, in vLLM's ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP).
SIZE_ARG = "no_repeat_ngram_size"
SKIP_ARG = "no_repeat_skip"  # leading prompt tokens (BOS + shared prefix) left out


class NGramBlocker:
    """One request's n-gram history. ``feed`` appends tokens, ``banned`` lists the tokens
    that may not come next. Called as ``blocker(prompt_ids, output_ids, logits)`` it is a
    per-request logits processor (vLLM's V1 model runner)."""

    def __init__(self, size: int, skip_prompt: int = 0) -> None:
        if size < 1:
            raise ValueError("n-gram size must be at least 1")
        self.size = size
        self.skip_prompt = skip_prompt  # shared-prefix tokens at the start of the prompt
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], set[int]] = {}
        self.outputs_fed: int | None = None  # None: the prompt is not fed yet

    def feed(self, tokens: Sequence[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        n = self.size
        for end in range(max(start + 1, n), len(self.tokens) + 1):
            gram = self.tokens[end - n : end]
            self.seen.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> list[int]:
        if len(self.tokens) + 1 < self.size:
            return []
        key = tuple(self.tokens[len(self.tokens) - self.size + 1 :])
        return sorted(self.seen.get(key, ()))

    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        if self.outputs_fed is None:
            self.feed(prompt_ids[self.skip_prompt :])
            self.outputs_fed = 0
        self.feed(output_ids[self.outputs_fed :])
        self.outputs_fed = len(output_ids)
        banned = self.banned()
        if banned:
            logits[banned] = float("-inf")
        return logits
