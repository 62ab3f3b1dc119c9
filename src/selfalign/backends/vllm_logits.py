"""vLLM logits processor for ``no_repeat_ngram_size`` (imported only with vLLM).

Loaded by the offline engine (``VLLMBackend`` registers it) and usable by ``vllm serve``:
    vllm serve MODEL --logits-processors selfalign.backends.vllm_logits:NoRepeatNGram
Requests switch it on with ``extra_args`` (``vllm_xargs`` over HTTP):
``{"no_repeat_ngram_size": N, "no_repeat_skip": K}``, K being the number of leading
prompt tokens (the shared prefix) left out of the n-gram history.

vLLM has two model runners with different processor interfaces: V1 (CPU builds, and GPUs
with ``VLLM_USE_V2_MODEL_RUNNER=0``) and V2 (the GPU default in recent vLLM). The one class
serves both, so registering it never depends on which runner the engine picks: the
runner's constructor call tells the two apart. Both share ``NGramBlocker``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from selfalign.backends.ngram import SIZE_ARG, SKIP_ARG, NGramBlocker

try:  # vLLM releases with the V2 model runner
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsProcessor as V2LogitsProcessor,
    )
except ImportError:  # pragma: no cover - older vLLM
    V2LogitsProcessor = object  # type: ignore[assignment,misc]


def _settings(params: SamplingParams) -> tuple[int, int]:
    args = params.extra_args or {}
    return int(args.get(SIZE_ARG, 0)), int(args.get(SKIP_ARG, 0))


class NoRepeatNGram(AdapterLogitsProcessor, V2LogitsProcessor):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, *runner_args: Any) -> None:
        # V1 passes (device, is_pin_memory); V2 passes (req_states,).
        self.req_states = runner_args[0] if len(runner_args) == 1 else None
        self.slots: dict[int, NGramBlocker] = {}  # V2: request slot -> its history
        if self.req_states is None:
            AdapterLogitsProcessor.__init__(self, vllm_config, *runner_args)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        for key in (SIZE_ARG, SKIP_ARG):
            value = args.get(key, 0)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")

    # -- V1 runner: per-request callables, batch bookkeeping by AdapterLogitsProcessor ------
    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices

    def new_req_logits_processor(self, params: SamplingParams) -> NGramBlocker | None:
        size, skip = _settings(params)
        return NGramBlocker(size, skip) if size > 0 else None

    # -- V2 runner: slots, and the committed token ids the runner keeps on the device -------
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        size, skip = _settings(sampling_params)
        self.slots.pop(req_idx, None)  # the slot may hold an earlier request's history
        if size > 0:
            self.slots[req_idx] = NGramBlocker(size, skip)
        return size > 0

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if self.req_states is None:
            return AdapterLogitsProcessor.apply(self, logits)
        if not self.slots:
            return logits
        rows = ctx.expanded_idx_mapping.tolist()
        ours = [(row, slot) for row, slot in enumerate(rows) if slot in self.slots]
        if not ours:
            return logits
        tokens, total = self.req_states.all_token_ids.gpu, self.req_states.total_len.gpu
        for row, slot in ours:
            blocker = self.slots[slot]
            fed = blocker.skip_prompt + len(blocker.tokens)
            blocker.feed(tokens[slot, fed : int(total[slot])].tolist())
            banned = blocker.banned()
            if banned:
                logits[row, banned] = float("-inf")
        return logits
