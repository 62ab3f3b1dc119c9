"""Loading the base model for LoRA, QLoRA or full fine-tuning, and the LoRA settings.

Precision: with LoRA the frozen base weights are loaded in the training precision (bf16 or
fp16 on a GPU) and peft keeps the small adapter in fp32. Full fine-tuning loads fp32 master
weights and trains under autocast, so AdamW updates are not lost to bf16 rounding.
QLoRA loads the base 4-bit NF4 (double quantisation) through bitsandbytes: CUDA only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from selfalign.errors import InputError
from selfalign.train.config import TrainConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(config: TrainConfig) -> str:
    """``auto`` -> bf16 on a GPU that has it, else fp32; checks what was asked is possible."""
    cuda = torch.cuda.is_available()
    if config.precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if config.precision == "fp16" and not cuda:
        raise InputError("fp16 training needs a CUDA GPU; use bf16 or fp32", field="precision")
    return config.precision


def check_method(config: TrainConfig) -> None:
    """Fail early, before any model is loaded, when the method cannot run here."""
    if config.method != "qlora":
        return
    if not torch.cuda.is_available():
        raise InputError(
            "qlora (4-bit NF4 via bitsandbytes) needs a CUDA GPU; use method lora or full on CPU",
            field="method",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            "qlora needs the bitsandbytes package (pip install bitsandbytes)", field="method"
        )


def merge_dtype(method: str, precision: str) -> torch.dtype:
    """The dtype a trained LoRA is merged in: the training precision; for QLoRA the 4-bit
    weights' compute dtype (bf16, or fp16 when asked), never 4-bit."""
    if method == "qlora":
        return _DTYPES["fp16" if precision == "fp16" else "bf16"]
    return _DTYPES[precision]


def qlora_quantization(compute: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's base: NF4 with double quantisation; quantising is deterministic, so loading
    with the same settings again gives the very 4-bit weights training saw."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # lets FSDP shard the 4-bit weights
    )


def check_base_model(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path)


def load_base_model(path: Path, config: TrainConfig, precision: str) -> PreTrainedModel:
    check_base_model(path)
    check_method(config)
    if config.method == "qlora":
        from accelerate import PartialState
        from peft import prepare_model_for_kbit_training

        compute = merge_dtype(config.method, precision)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=qlora_quantization(compute),
            dtype=compute,
            device_map={"": PartialState().local_process_index},
        )
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    dtype = _DTYPES[precision] if config.method == "lora" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing, on whichever API this transformers has
    (``activation_checkpointing_enable`` since 5.2x, ``gradient_checkpointing_enable``
    before), with input grads on so a frozen base still backpropagates into adapters."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def lora_config(config: TrainConfig) -> LoraConfig | None:
    if config.method == "full":
        return None
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
