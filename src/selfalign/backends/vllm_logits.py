"""vLLM logits processor for ``no_repeat_ngram_size`` (imported only with vLLM).

Loaded by the offline engine (``VLLMBackend`` registers it) and usable by ``vllm serve``:
    vllm serve MODEL --logits-processors selfalign.backends.vllm_logits:NoRepeatNGram
Requests switch it on with ``extra_args`` (``vllm_xargs`` over HTTP):
``{"no_repeat_ngram_size": N, "no_repeat_skip": K}``, K being the number of leading
prompt tokens (the shared prefix) left out of the n-gram history.
"""

from __future__ import annotations

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from selfalign.backends.ngram import SIZE_ARG, SKIP_ARG, NGramBlocker


class NoRepeatNGram(AdapterLogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        for key in (SIZE_ARG, SKIP_ARG):
            value = args.get(key, 0)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices

    def new_req_logits_processor(self, params: SamplingParams) -> NGramBlocker | None:
        args = params.extra_args or {}
        size = int(args.get(SIZE_ARG, 0))
        return NGramBlocker(size, int(args.get(SKIP_ARG, 0))) if size > 0 else None
