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
    """Per-request state; called as ``blocker(prompt_ids, output_ids, logits)``."""

    def __init__(self, size: int, skip_prompt: int = 0) -> None:
        if size < 1:
            raise ValueError("n-gram size must be at least 1")
        self.size = size
        self.skip_prompt = skip_prompt  # shared-prefix tokens at the start of the prompt
        self.seen: dict[tuple[int, ...], set[int]] = {}
        self.indexed = 0  # n-grams of ``tokens`` ending before this position are indexed
        self.tokens: list[int] | None = None
        self.outputs_taken = 0

    def _extend(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> list[int]:
        if self.tokens is None:
            self.tokens = list(prompt_ids[self.skip_prompt :])
        self.tokens.extend(output_ids[self.outputs_taken :])
        self.outputs_taken = len(output_ids)
        n = self.size
        for end in range(max(self.indexed, n), len(self.tokens) + 1):
            gram = self.tokens[end - n : end]
            self.seen.setdefault(tuple(gram[:-1]), set()).add(gram[-1])
        self.indexed = max(self.indexed, len(self.tokens) + 1)
        return self.tokens

    def banned(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> list[int]:
        tokens = self._extend(prompt_ids, output_ids)
        if len(tokens) + 1 < self.size:
            return []
        key = tuple(tokens[len(tokens) - self.size + 1 :])
        return sorted(self.seen.get(key, ()))

    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        banned = self.banned(prompt_ids, output_ids)
        if banned:
            logits[banned] = float("-inf")
        return logits
