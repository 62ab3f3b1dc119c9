"""Train MoTE (or a baseline) on AlignCoT chains with the transformers ``Trainer``.

Methods (``MoteTrainConfig.method``):
- ``mote``: packed chains, step experts + shared expert, step skipping with
  probability ``step_skip_prob``;
- ``mote_no_shared``: the same without the shared expert (step expert at weight 1);
- ``mote_no_skip``: the same with step skipping off;
- ``lora``: one plain peft LoRA adapter on the same layers and packed chains, no skipping;
- ``expanded``: the naive multi-LoRA training MoTE is compared with: the MoTE
  architecture, but every step and every skip pattern is a separate example routed
  to that step's expert (see ``data.Encoder.expanded``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
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
from selfalign.mote.config import METRICS_FILE, MoteTrainConfig
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
from selfalign.train.model import enable_checkpointing
from selfalign.train.reporting import check_reporting, report_callbacks, trainer_report_to


@dataclass
class MoteTrainResult:
    path: Path
    metrics: dict[str, Any]


class _MoteTrainer(Trainer):
    """Checkpoints hold the adapter only (the base never changes)."""

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


def load_base(path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    return model, tokenizer


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
    check_reporting(config.report_to)  # before the model loads
    dtype = _dtype(config.dtype, config.device)
    set_seed(config.seed)  # the LoRA A matrices are drawn when the experts are built
    model, tokenizer = load_base(base_model, dtype, config.attn_implementation)
    mote = config.resolved_mote()
    if config.method == "lora":
        model = build_lora(model, tokenizer, mote, system=config.system)
    else:
        build_mote(model, tokenizer, mote, system=config.system)
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
        with_step_ids=config.method != "lora",
        mask_dtype=dtype,
    )
    per_device = config.per_device_batch_size or config.batch_size
    checkpoints = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=max(1, config.batch_size // per_device),
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
    last = resume_point(checkpoints, _fingerprint(chains, base_model, config), config.resume)
    output = trainer.train(resume_from_checkpoint=last)
    model.eval()
    main = trainer.is_world_process_zero()
    if main:
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
        "train_loss": output.training_loss,
        **{k: v for k, v in output.metrics.items() if isinstance(v, int | float)},
    }
    if main:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return MoteTrainResult(out, metrics)


def _fingerprint(chains: Sequence[Chain], base_model: str | Path, config: MoteTrainConfig) -> str:
    """What a checkpoint depends on; checkpoints of other inputs are not resumed."""
    h = hashlib.sha256()
    settings = config.model_dump(
        exclude={"resume", "progress", "logging_steps", "max_steps", "report_to", "logging_dir"}
    )
    h.update(json.dumps([settings, str(Path(base_model).resolve())], sort_keys=True).encode())
    for chain in chains:
        h.update(chain.model_dump_json().encode())
    return h.hexdigest()
