"""What a finished training leaves behind: the training log and, if asked, merged weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.json"
MERGED_SUBDIR = "merged"
CHECK_EXAMPLES = 4  # texts the merge check runs
CHECK_TOKENS = 64  # tokens of each
# Merge check tolerance: how far the merged model's logits may be from base + adapter, as a
# fraction of the largest |logit|, by the merged weights' dtype. Merging rounds every weight
# once more to that dtype, which moves logits by one to three machine epsilons of their
# scale: Gemma 3 270M, random rank-16 adapters on all linear layers, checked in float32:
# LoRA bf16 0.12-0.50 and fp16 0.043-0.057 at |logit| <= 34.6 (0.5-1.9 and 1.3-1.7
# epsilons); QLoRA into the dequantised NF4 base (bitsandbytes' CPU backend), bf16, 0.78
# at 37.8 (2.6 epsilons), where merging into the original weights instead was 19.1 away. Eight epsilons leave room for
# deeper models and still catch a merge into the wrong base (the quantisation error) or
# into 4-bit weights. Float32 merges differ only by the order of arithmetic (7e-5 to
# 1.5e-4 measured, up to 4e-6 of the scale): 1e-4 of the scale, and never below MERGE_ATOL.
MERGE_RTOL = {"float32": 1e-4, "bfloat16": 8 * 2**-7, "float16": 8 * 2**-10}
MERGE_ATOL = 1e-3


def write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_adapter(
    adapter_dir: Path, merged_dir: Path, *, dtype: torch.dtype, quantized: bool = False
) -> dict[str, str]:
    """Fold a LoRA adapter into its base weights: a plain model dir, no peft needed to load it.

    The base is loaded from the path in ``adapter_config.json`` (``base_model_name_or_path``,
    the local directory training read) in ``dtype``. A QLoRA adapter (``quantized``) learned
    its correction on top of the NF4 weights, not the original ones: the base is quantised
    again with the training settings (deterministic, so the same 4-bit weights) and
    dequantised to ``dtype``, and the adapter is merged into that, never into 4-bit weights
    (peft would re-quantise the sum). A base directory that is itself quantised (its
    config.json has a ``quantization_config``) is dequantised the same way. Returns how:
    ``{"dtype": ..., "base": "dequantized" | "full precision"}``.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, how = _merge_base(adapter_dir, dtype, quantized)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = merged_dir.with_name(f".{merged_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    del merged, base
    _free_memory()
    shutil.rmtree(merged_dir, ignore_errors=True)
    tmp.rename(merged_dir)
    return {"dtype": _dtype_name(dtype), "base": how}


def merge_check(
    adapter_dir: Path, merged_dir: Path, texts: Sequence[str], *, quantized: bool = False
) -> float:
    """The largest absolute difference between the logits of the merged model and those of
    base + adapter, over every position of ``texts`` (each cut to ``CHECK_TOKENS`` tokens).

    The base is the one ``merge_adapter`` merges into (for QLoRA the NF4 weights training
    saw, dequantised: the values the 4-bit kernels compute with) and the adapter stays
    apart, in float32. Both models run in float32 (upcasting bf16/fp16 weights is exact),
    so the difference is what merging itself changed, the rounding of base + delta to the
    merged dtype, not the noise of half-precision arithmetic. Runs on the GPU if any."""
    return compare_merge(adapter_dir, merged_dir, texts, quantized=quantized)["max_logit_diff"]


def compare_merge(
    adapter_dir: Path, merged_dir: Path, texts: Sequence[str], *, quantized: bool = False
) -> dict[str, float]:
    """``merge_check``'s difference, with the scale to judge it by: the largest |logit| of
    base + adapter, and how far the adapter moves the base's logits (``adapter_effect``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    batches = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=CHECK_TOKENS)
        for text in texts
    ]
    if not batches:
        raise ValueError("merge_check needs at least one text")
    base, _ = _merge_base(adapter_dir, AutoConfig.from_pretrained(merged_dir).dtype, quantized)
    reference = PeftModel.from_pretrained(base.float(), adapter_dir)
    want = _logits(reference, batches)
    with reference.disable_adapter():
        plain = _logits(reference, batches)
    del reference, base
    _free_memory()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    got = _logits(merged, batches)
    del merged
    _free_memory()

    def largest(pairs) -> float:
        return max(float((a - b).abs().max()) for a, b in pairs)

    return {
        "max_logit_diff": largest(zip(got, want, strict=True)),
        "max_abs_logit": max(float(w.abs().max()) for w in want),
        "adapter_effect": largest(zip(plain, want, strict=True)),
    }


def merge_tolerance(dtype: str, max_abs_logit: float) -> float:
    """How far merged logits may be from base + adapter: ``MERGE_RTOL[dtype]`` times the
    largest |logit|, and never below ``MERGE_ATOL`` (float32 arithmetic in another order)."""
    return max(MERGE_ATOL, MERGE_RTOL[dtype] * max_abs_logit)


def merge_and_check(
    adapter_dir: Path,
    merged_dir: Path,
    *,
    dtype: torch.dtype,
    quantized: bool,
    texts: Sequence[str],
) -> dict[str, Any]:
    """``merge_adapter``, then ``compare_merge``: what ``train_log.json`` records as
    ``merge``. Above the tolerance the merged weights are not the model that was trained,
    and the log says so as an error; a merge that rounds away much of what the adapter
    changed gets a warning."""
    record: dict[str, Any] = merge_adapter(
        adapter_dir, merged_dir, dtype=dtype, quantized=quantized
    )
    record.update(compare_merge(adapter_dir, merged_dir, texts, quantized=quantized))
    diff = record["max_logit_diff"]
    record["tolerance"] = merge_tolerance(record["dtype"], record["max_abs_logit"])
    record["ok"] = diff <= record["tolerance"]
    if not record["ok"]:
        log.error(
            "MERGE CHECK FAILED: %s gives logits up to %.4g away from base + adapter (tolerance "
            "%.4g for %s): use the adapter (%s) rather than the merged weights",
            merged_dir, diff, record["tolerance"], record["dtype"], adapter_dir,
        )  # fmt: skip
    elif diff > record["adapter_effect"] / 2:
        log.warning(
            "merging in %s moves logits by up to %.4g, against %.4g for the adapter itself: "
            "the merged weights lose much of the fine-tuning; the adapter (%s) keeps it",
            record["dtype"], diff, record["adapter_effect"], adapter_dir,
        )  # fmt: skip
    return record


def merge_trained(
    adapter_dir: Path, merged_dir: Path, examples: Sequence[dict], system_text: str,
    *, method: str, precision: str,
) -> dict[str, Any]:  # fmt: skip
    """Merge a trained adapter (see ``merge_adapter``) and check it on its first training
    examples: the ``merge`` record of ``train_log.json``, its warnings included."""
    from selfalign.train.model import merge_dtype

    record = merge_and_check(
        adapter_dir, merged_dir, dtype=merge_dtype(method, precision),
        quantized=method == "qlora", texts=check_texts(adapter_dir, examples, system_text),
    )  # fmt: skip
    return {**record, "warnings": merge_warnings(record)}


def merge_warnings(record: dict[str, Any]) -> list[str]:
    """The line ``train_log.json``'s warnings get for a merge that failed its check."""
    if record["ok"]:
        return []
    return [
        f"merged weights are up to {record['max_logit_diff']:.3g} logits away from base + "
        f"adapter (tolerance {record['tolerance']:.3g}): use the adapter"
    ]


def check_texts(
    tokenizer_dir: Path, examples: Sequence[dict], system_text: str, n: int = CHECK_EXAMPLES
) -> list[str]:
    """The first ``n`` training examples as the saved chat template renders them: the
    merge check compares the models where the adapter was trained."""
    from transformers import AutoTokenizer

    from selfalign.train.data import to_conversation

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    convs = [to_conversation(r, system_text) for r in list(examples)[:n]]
    return [
        tokenizer.apply_chat_template(c["prompt"] + c["completion"], tokenize=False) for c in convs
    ]


def adapter_base_path(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (its adapter_config.json says)."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path


def _merge_base(adapter_dir: Path, dtype: torch.dtype, quantized: bool) -> tuple[Any, str]:
    """(the base an adapter is merged into, in ``dtype``; "dequantized" or "full precision")."""
    base = _load_base(adapter_base_path(adapter_dir), dtype, quantized)
    if getattr(base, "hf_quantizer", None) is None:
        return base, "full precision"
    return base.dequantize(dtype=dtype), "dequantized"


def _load_base(path: str, dtype: torch.dtype, quantized: bool):
    """The base as training loaded it: NF4 on this process's GPU for QLoRA, else ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from selfalign.train.model import qlora_quantization

    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=qlora_quantization(dtype),
        dtype=dtype,
        device_map={"": torch.cuda.current_device()},
    )


def _logits(model, batches: list) -> list[torch.Tensor]:
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return [
            model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu() for b in batches
        ]


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def loss_history(log_history: list[dict]) -> list[dict]:
    """The per-step entries of ``Trainer.state.log_history`` (loss, lr, grad norm, ...)."""
    return [
        {k: v for k, v in entry.items() if isinstance(v, int | float)}
        for entry in log_history
        if "loss" in entry
    ]
