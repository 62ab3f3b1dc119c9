"""Train MoTE (or a baseline) on AlignCoT chains with the transformers ``Trainer``.

Methods (``MoteTrainConfig.method``):
- ``mote``: packed chains, step experts + shared expert, step skipping with
  probability ``step_skip_prob``;
- ``mote_no_shared``: the same without the shared expert (step expert at weight 1);
- ``mote_no_skip``: the same with step skipping off;
- ``mote_no_both``: neither the shared expert nor step skipping (Table 4's "-both");
- ``vanilla_moe``: the same step experts (no shared one), mixed per token by a learned
  top-k linear gate with a load-balancing loss instead of by the chain's steps;
- ``mixlora``: that gate plus an expert-contrastive loss (``layer.MoteLinear._gated``);
- ``lora``: one plain peft LoRA adapter on the same layers and packed chains, no skipping;
- ``expanded``: the naive multi-LoRA training MoTE is compared with: the MoTE
  architecture, but every step and every skip pattern is a separate example routed
  to that step's expert (see ``data.Encoder.expanded``); it decodes the same way, the
  context recomputed by each step's expert (``MoteConfig.recompute_at_switch``).

Memory at 7-8B: activation checkpointing and a small per-device batch by default, and
``quantize_base: true`` trains the experts over a 4-bit NF4 base (CUDA only); the saved
model directory then holds the original base weights with the experts trained over NF4.
Several processes run as DDP (``python -m selfalign.mote.train_entry`` under ``accelerate
launch``); FSDP and DeepSpeed ZeRO-3 are refused (``check_sharding``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from selfalign.errors import InputError
from selfalign.mote.config import GATED, METRICS_FILE, MoteTrainConfig
from selfalign.mote.data import Chain, Encoder, StepCollator
from selfalign.mote.model import (
    ADAPTER_FILE,
    adapter_state_dict,
    build_lora,
    build_mote,
    mote_state,
    save_mote,
)
from selfalign.train.checkpoints import resume_point
from selfalign.train.model import enable_checkpointing, qlora_quantization
from selfalign.train.reporting import check_reporting, report_callbacks, trainer_report_to


@dataclass
class MoteTrainResult:
    path: Path
    metrics: dict[str, Any]


class _MoteTrainer(Trainer):
    """Checkpoints hold the adapter only (the base never changes). The gated methods add
    their weighted auxiliary losses (the layers' mean) to the language-model loss."""

    last_aux: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        state = mote_state(self.model)  # (``model`` may be wrapped for DDP)
        if state.router is None or state.router.gate_top_k is None:
            return out
        loss = out[0] if return_outputs else out
        weights = {"balance": state.config.balance_weight,
                   "contrastive": state.config.contrastive_weight}  # fmt: skip
        aux = state.router.take_aux()
        self.last_aux = {k: float(v.detach()) for k, v in aux.items()}
        extra = sum(weights[k] * v for k, v in aux.items())
        if self.model_accepts_loss_kwargs and kwargs.get("num_items_in_batch") is not None:
            extra = extra / self.current_gradient_accumulation_steps  # as the LM loss was
        loss = loss + extra
        return (loss, *out[1:]) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if mote_state(self.model).method == "lora":
            return super()._save(output_dir, state_dict)
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state_dict(self.model), str(out / ADAPTER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if mote_state(self.model).method == "lora":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        weights = load_file(str(Path(resume_from_checkpoint) / ADAPTER_FILE))
        (model or self.model).load_state_dict(weights, strict=False)


class _EpochToCollator(TrainerCallback):
    """Tells the collator the epoch, which seeds its per-example draws."""

    def __init__(self, collator: StepCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.collator.epoch = int(state.epoch or 0)


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


SHARDING_REFUSED = (
    "MoTE training runs as DDP only: {what} shards the expert weights and the step-token "
    "rows, which MoTE's checkpoints and save do not gather; use configs/accelerate/ddp.yaml "
    "(with train.quantize_base: true if the base does not fit one GPU)"
)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_sharding(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse FSDP and DeepSpeed ZeRO-3 as ``accelerate launch`` announces them (its
    environment), before the model loads."""
    if _flag(environ, "ACCELERATE_USE_FSDP"):
        raise InputError(SHARDING_REFUSED.format(what="FSDP"))
    zero = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED") and zero == "3":
        raise InputError(SHARDING_REFUSED.format(what="DeepSpeed ZeRO-3"))


def _check_trainer_sharding(trainer: Trainer) -> None:
    """The same refusal from the Trainer's own view (a DeepSpeed JSON file names its
    stage only there)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False):
        raise InputError(SHARDING_REFUSED.format(what="FSDP"))
    if plugin is not None and plugin.zero_stage == 3:
        raise InputError(SHARDING_REFUSED.format(what="DeepSpeed ZeRO-3"))


def check_quantization(config: MoteTrainConfig) -> None:
    """``quantize_base`` needs CUDA and bitsandbytes: fail before any model loads."""
    if not config.quantize_base:
        return
    if config.device == "cpu" or not torch.cuda.is_available():
        raise InputError(
            "quantize_base (a 4-bit NF4 base via bitsandbytes) needs a CUDA GPU; set "
            "quantize_base: false to train on CPU",
            field="quantize_base",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            "quantize_base needs the bitsandbytes package (pip install bitsandbytes)",
            field="quantize_base",
        )


def world_size() -> int:
    """Processes in this training (set by ``accelerate launch`` / torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_base(
    path: str | Path,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    quantize: bool = False,
):
    """The base model and tokenizer; ``quantize``: NF4 weights computing in ``dtype`` on
    this process's GPU, the other weights (norms, embeddings) in float32 for training."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    extra: dict[str, Any] = {}
    if quantize:
        from accelerate import PartialState

        extra = {
            "quantization_config": qlora_quantization(dtype),
            "device_map": {"": PartialState().local_process_index},
        }
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **extra
    )
    if quantize:
        from peft import prepare_model_for_kbit_training

        # checkpointing is ours to turn on (non-reentrant), after the experts exist
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


@contextmanager
def _experts_count_as_adapters(model: torch.nn.Module) -> Iterator[None]:
    """The Trainer refuses a quantized model without a peft adapter it recognises; MoTE's
    experts are peft adapters injected without a ``PeftModel`` wrapper, so say so while
    the Trainer checks, and no longer (``save_pretrained`` reads the same flag)."""
    before = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = before


def _build(model, tokenizer, config: MoteTrainConfig):
    mote = config.resolved_mote()
    if config.method == "lora":
        return build_lora(model, tokenizer, mote, system=config.system)
    build_mote(model, tokenizer, mote, system=config.system)
    return model


@torch.no_grad()
def _save_over_full_base(
    model, tokenizer, base_model: str | Path, config: MoteTrainConfig, dtype: torch.dtype, out: Path
) -> None:
    """Save experts trained over a 4-bit base on the unquantised base (in ``dtype``), so
    the model directory loads anywhere; the step-token rows are stored whole, not as
    deltas, so they do not depend on the base's rows."""
    weights = {k: v.to("cpu") for k, v in adapter_state_dict(model).items()}
    plain, _ = load_base(base_model, dtype, config.attn_implementation)
    plain = _build(plain, tokenizer, config)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    if unexpected or set(adapter_state_dict(plain)) & set(missing):
        raise RuntimeError("the trained experts do not fit the unquantised base")
    plain.eval()
    save_mote(plain, tokenizer, out)


def train_mote(
    chains: Sequence[Chain | dict],
    base_model: str | Path,
    out_dir: str | Path,
    config: MoteTrainConfig | None = None,
) -> MoteTrainResult:
    """Train on chains from ``base_model`` and save the result to ``out_dir``.

    ``out_dir`` becomes a model directory ``load_mote`` reads (``save_mote`` layout),
    plus ``train_metrics.json``.
    """
    config = config or MoteTrainConfig()
    chains = [c if isinstance(c, Chain) else Chain.model_validate(c) for c in chains]
    if not chains:
        raise InputError("no chains to train on")
    out = Path(out_dir)
    # before the model loads: settings this machine or launch cannot run
    check_reporting(config.report_to)
    check_sharding()
    check_quantization(config)
    processes = world_size()
    accumulation = config.accumulation_steps(processes)
    dtype = _dtype(config.dtype, config.device)
    set_seed(config.seed)  # the LoRA A matrices are drawn when the experts are built
    model, tokenizer = load_base(
        base_model, dtype, config.attn_implementation, quantize=config.quantize_base
    )
    model = _build(model, tokenizer, config)
    if config.gradient_checkpointing:
        # Routing stays set until the next forward, so recomputation routes identically.
        enable_checkpointing(model)
    tokens = mote_state(model).tokens
    encoder = Encoder(tokenizer, tokens, config.system, config.max_length)
    dataset = encoder.dataset(chains, expanded=config.method == "expanded")
    collator = StepCollator(
        tokenizer.pad_token_id,
        skip_prob=config.skip_prob,
        seed=config.seed,
        with_step_ids=config.method not in ("lora", *GATED),
        with_token_mask=config.method in GATED,
        mask_dtype=dtype,
    )
    checkpoints = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.per_device(processes),
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        report_to=trainer_report_to(config.report_to),
        remove_unused_columns=False,
        seed=config.seed,
        use_cpu=config.device == "cpu" or not torch.cuda.is_available(),
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    with _experts_count_as_adapters(model):
        trainer = _MoteTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=dataset,
            callbacks=[
                _EpochToCollator(collator),
                *report_callbacks(config.report_to, out, config.logging_dir),
            ],
        )
    _check_trainer_sharding(trainer)
    fingerprint = _fingerprint(chains, base_model, config, processes)
    last = resume_point(checkpoints, fingerprint, config.resume)
    output = trainer.train(resume_from_checkpoint=last)
    model.eval()
    main = trainer.is_world_process_zero()
    if main:
        if config.quantize_base:
            _save_over_full_base(model, tokenizer, base_model, config, dtype, out)
        else:
            save_mote(model, tokenizer, out)
        if config.save_strategy == "no":
            shutil.rmtree(checkpoints, ignore_errors=True)
    metrics = {
        "method": config.method,
        "chains": len(chains),
        "examples": len(dataset),
        "truncated": encoder.truncated,
        "tokens": sum(len(ex["input_ids"]) for ex in dataset),
        "loss_tokens": sum(sum(label != -100 for label in ex["labels"]) for ex in dataset),
        "steps": output.global_step,
        "processes": processes,
        "per_device_batch_size": config.per_device(processes),
        "gradient_accumulation_steps": accumulation,
        "quantized_base": config.quantize_base,
        "train_loss": output.training_loss,
        **{f"last_{k}_loss": v for k, v in trainer.last_aux.items()},
        **{k: v for k, v in output.metrics.items() if isinstance(v, int | float)},
    }
    if main:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return MoteTrainResult(out, metrics)


def _fingerprint(
    chains: Sequence[Chain], base_model: str | Path, config: MoteTrainConfig, processes: int
) -> str:
    """What a checkpoint depends on; checkpoints of other inputs are not resumed."""
    h = hashlib.sha256()
    settings = config.model_dump(
        exclude={"resume", "progress", "logging_steps", "max_steps", "report_to", "logging_dir"}
    )
    key = [settings, str(Path(base_model).resolve()), processes]
    h.update(json.dumps(key, sort_keys=True).encode())
    for chain in chains:
        h.update(chain.model_dump_json().encode())
    return h.hexdigest()
