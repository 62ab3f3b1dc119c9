"""vLLM logits processor for the n-gram rules of ``ngram`` (imported only with vLLM).

Loaded by the offline engine (``VLLMBackend`` registers it) and usable by ``vllm serve``:
    vllm serve MODEL --logits-processors selfalign.backends.vllm_logits:NoRepeatNGram
Requests switch it on with ``extra_args`` (``vllm_xargs`` over HTTP):
``{"no_repeat_ngram_size": N, "ngram_penalties": "3:1.0,4:2.0"}``. Only generated tokens
count; fenced code is exempt, which needs the token texts: the model's tokenizer is
loaded on the first request that asks for a rule.

vLLM has two model runners with different processor interfaces: V1 (CPU builds, and GPUs
with ``VLLM_USE_V2_MODEL_RUNNER=0``) and V2 (the GPU default in recent vLLM). The one class
serves both, so registering it never depends on which runner the engine picks: the
runner's constructor call tells the two apart. Both share ``NGramRules`` with the hf
backend.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from selfalign.backends.ngram import (
    PENALTIES_ARG,
    SIZE_ARG,
    NGramRules,
    TokenText,
    apply_rules,
    rules_from_args,
    token_texts,
)

try:  # vLLM releases with the V2 model runner
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsProcessor as V2LogitsProcessor,
    )
except ImportError:  # pragma: no cover - older vLLM
    V2LogitsProcessor = object  # type: ignore[assignment,misc]


class NoRepeatNGram(AdapterLogitsProcessor, V2LogitsProcessor):  # type: ignore[misc]
    """The n-gram rules (the name is kept from when it only did no_repeat_ngram_size)."""

    def __init__(self, vllm_config: Any, *runner_args: Any) -> None:
        # V1 passes (device, is_pin_memory); V2 passes (req_states,).
        self.req_states = runner_args[0] if len(runner_args) == 1 else None
        self.model_config = getattr(vllm_config, "model_config", None)
        self._token_text: TokenText | None = None
        self.slots: dict[int, NGramRules] = {}  # V2: request slot -> its rules
        self.starts: dict[int, int] = {}  # V2: request slot -> where its output starts
        if self.req_states is None:
            AdapterLogitsProcessor.__init__(self, vllm_config, *runner_args)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        rules_from_args(sampling_params.extra_args, None)

    def _rules(self, params: SamplingParams) -> NGramRules | None:
        args = params.extra_args or {}
        if not (args.get(SIZE_ARG) or args.get(PENALTIES_ARG)):
            return None  # no tokenizer loaded for requests that ask for nothing
        return rules_from_args(args, self.token_text())

    def token_text(self) -> TokenText | None:
        """The served model's token texts (None without an engine config, as in tests)."""
        if self._token_text is None and self.model_config is not None:
            from transformers import AutoTokenizer

            mc = self.model_config
            tokenizer = AutoTokenizer.from_pretrained(
                mc.tokenizer,
                revision=getattr(mc, "tokenizer_revision", None),
                trust_remote_code=getattr(mc, "trust_remote_code", False),
            )
            self._token_text = token_texts(tokenizer)
        return self._token_text

    # -- V1 runner: per-request callables, batch bookkeeping by AdapterLogitsProcessor ------
    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices

    def new_req_logits_processor(self, params: SamplingParams) -> NGramRules | None:
        return self._rules(params)

    # -- V2 runner: slots, and the committed token ids the runner keeps on the device -------
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        rules = self._rules(sampling_params)
        self.slots.pop(req_idx, None)  # the slot may hold an earlier request's state
        self.starts.pop(req_idx, None)
        if rules is not None:
            self.slots[req_idx] = rules
        return rules is not None

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if self.req_states is None:
            return AdapterLogitsProcessor.apply(self, logits)
        if not self.slots:
            return logits
        rows = ctx.expanded_idx_mapping.tolist()
        ours = [(row, slot) for row, slot in enumerate(rows) if slot in self.slots]
        if not ours:
            return logits
        self._catch_up(list(dict.fromkeys(slot for _, slot in ours)))
        return apply_rules(logits, [(row, self.slots[slot]) for row, slot in ours])

    def _catch_up(self, slots: list[int]) -> None:
        """Feed each slot's rules the output tokens committed since its last step: a few
        batched reads from the runner's buffers, not one per request."""
        state = self.req_states
        new = [slot for slot in slots if slot not in self.starts]
        if new:  # read on the first step, once the runner has written the prompt
            self.starts.update(zip(new, _read(state.prompt_len.gpu, new), strict=True))
        ends = _read(state.total_len.gpu, slots)
        spans = [
            (slot, self.starts[slot] + len(self.slots[slot].tokens), end)
            for slot, end in zip(slots, ends, strict=True)
        ]
        where_slot = [slot for slot, fed, end in spans for _ in range(fed, end)]
        where_pos = [pos for _, fed, end in spans for pos in range(fed, end)]
        fresh = iter(_read(state.all_token_ids.gpu, where_slot, where_pos))
        for slot, fed, end in spans:
            self.slots[slot].feed([next(fresh) for _ in range(fed, end)])


def _read(buffer: torch.Tensor, *index: list[int]) -> list[int]:
    """``buffer[index]`` as a list, in one read (nothing to read: no device access)."""
    if not index[0]:
        return []
    return buffer[tuple(torch.tensor(ix, device=buffer.device) for ix in index)].tolist()
