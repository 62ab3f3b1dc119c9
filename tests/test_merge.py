"""Merged weights are the trained model: ``merge_and_check`` folds the adapter into the base
training used (the dequantised NF4 weights for QLoRA) and measures the merged model's
logits against base + adapter, on the tiny model after real training steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from selfalign.train import TrainConfig, train_sft
from selfalign.train.export import (
    MERGE_ATOL,
    check_texts,
    compare_merge,
    merge_and_check,
    merge_check,
    merge_tolerance,
)

SYSTEM = "You are Tester, a careful assistant."
EXAMPLES = [
    {"prompt": "What is 2 plus 3?", "answer": "2 plus 3 is 5."},
    {"prompt": "Name a primary colour.", "answer": "Red is a primary colour."},
    {"prompt": "Say hello in French.", "answer": "Bonjour !"},
    {"prompt": "List two fruits.", "answer": "1. Apple\n2. Pear"},
    {"prompt": "Is water wet?", "answer": "Water makes other things wet."},
    {"prompt": "What day follows Monday?", "answer": "Tuesday follows Monday."},
]
FAST = {
    "max_steps": 6,
    "warmup_ratio": 0.0,
    "per_device_batch_size": 2,
    "global_batch_size": 2,
    "gradient_checkpointing": False,
    "learning_rate": 2e-3,  # a few steps that move the adapter well clear of zero
}


@pytest.fixture(scope="module")
def merged_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("merge") / "model"
    return train_sft(EXAMPLES, tiny_model, out, TrainConfig(**FAST, merge=True), system_text=SYSTEM)


def test_merged_logits_equal_base_plus_adapter_and_the_log_says_how(merged_run, tiny_model):
    out, merged_dir = merged_run.model_dir, merged_run.merged_dir
    log = json.loads((out / "train_log.json").read_text())
    merge = log["merge"]
    assert merge == merged_run.merge
    assert (merge["dtype"], merge["base"], merge["ok"]) == ("float32", "full precision", True)
    assert log["precision"] == "fp32" and merge["tolerance"] == MERGE_ATOL
    assert 0 <= merge["max_logit_diff"] < 1e-4
    assert merge["adapter_effect"] > 100 * merge["max_logit_diff"]  # it measures something

    # the same comparison made by hand, on texts of our own
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for text in ["Hello there, how are you?", "1 2 3 4 5 6 7 8 9", "Bonjour !"]:
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(
                merged(**inputs).logits, with_adapter(**inputs).logits, rtol=0, atol=1e-4
            )
    assert merge_check(out, merged_dir, ["Hello there, how are you?"]) < 1e-4


def test_the_check_fails_a_merge_that_lost_the_adapter(merged_run, tiny_model):
    """The base folder standing in for merged weights: the check sees the adapter's whole
    effect, well above the tolerance."""
    texts = check_texts(merged_run.model_dir, EXAMPLES, SYSTEM)
    assert len(texts) == 4 and all(SYSTEM in t for t in texts)
    lost = compare_merge(merged_run.model_dir, tiny_model, texts)
    assert lost["max_logit_diff"] == pytest.approx(lost["adapter_effect"])
    assert lost["max_logit_diff"] > 10 * merge_tolerance("float32", lost["max_abs_logit"])


def test_a_bf16_merge_is_written_in_bf16_and_checked_in_float32(merged_run, tmp_path):
    texts = check_texts(merged_run.model_dir, EXAMPLES, SYSTEM)
    merge = merge_and_check(
        merged_run.model_dir, tmp_path / "bf16", dtype=torch.bfloat16, quantized=False, texts=texts
    )
    assert AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert (merge["dtype"], merge["base"], merge["ok"]) == ("bfloat16", "full precision", True)
    # rounding every weight to bf16 once more: within 8 epsilons of the logit scale
    assert 0 < merge["max_logit_diff"] <= merge["tolerance"]
    assert merge["tolerance"] == pytest.approx(max(MERGE_ATOL, 8 * 2**-7 * merge["max_abs_logit"]))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA merge check needs a CUDA GPU and bitsandbytes",
)
def test_qlora_merges_into_the_dequantized_nf4_base(tiny_model: Path, tmp_path: Path):
    cfg = TrainConfig(**FAST, method="qlora", merge=True)
    result = train_sft(EXAMPLES, tiny_model, tmp_path / "q", cfg, system_text=SYSTEM)
    merge = json.loads((result.model_dir / "train_log.json").read_text())["merge"]
    assert (merge["dtype"], merge["base"], merge["ok"]) == ("bfloat16", "dequantized", True)
    config = AutoConfig.from_pretrained(result.merged_dir)
    assert config.dtype == torch.bfloat16 and getattr(config, "quantization_config", None) is None
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # merging into the original weights instead misses the NF4 base the adapter learned on
    texts = check_texts(result.model_dir, EXAMPLES, SYSTEM)
    from selfalign.train.export import merge_adapter

    wrong = merge_adapter(result.model_dir, tmp_path / "full", dtype=torch.bfloat16)
    assert wrong["base"] == "full precision"
    off = merge_check(result.model_dir, tmp_path / "full", texts, quantized=True)
    assert off > merge["max_logit_diff"]
