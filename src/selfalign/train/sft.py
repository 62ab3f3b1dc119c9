"""Supervised fine-tuning on (prompt, answer) pairs: principle engraving and verbose cloning.

``train_sft`` builds trl's ``SFTTrainer`` on a conversational prompt-completion dataset
(see ``train.data``), so the loss is on the answer tokens only, and writes ``out_dir``:

    out_dir/
      adapter_config.json, adapter_model.safetensors   # LoRA / QLoRA (full: config + weights)
      tokenizer files + chat template                  # selfalign's format, system text built in
      train_log.json                                   # config, counts, warnings, per-step losses
      merged/                                          # with merge: true; plain HF model dir
      logs/                                            # with report_to: [tensorboard]
      checkpoints/checkpoint-N/                        # while training (kept if asked)

A killed training run again with the same inputs resumes from its last checkpoint (model,
optimizer, scheduler, RNG and data position) and ends where an uninterrupted one would.
The same code runs under ``accelerate launch`` (DDP, FSDP, DeepSpeed): see
``python -m selfalign.train --help`` and configs/accelerate/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from selfalign.errors import InputError
from selfalign.train.checkpoints import resume_point
from selfalign.train.config import TrainConfig
from selfalign.train.data import conversation_dataset, to_conversation, validate_examples
from selfalign.train.export import (
    MERGED_SUBDIR,
    TRAIN_LOG,
    loss_history,
    merge_trained,
    write_json_atomic,
)
from selfalign.train.model import (
    check_base_model,
    check_method,
    load_base_model,
    lora_config,
    resolve_precision,
)
from selfalign.train.reporting import report_callbacks, trainer_report_to
from selfalign.train.template import apply_template, choose_template, template_round_trip

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
# Settings that do not change what the training computes (safe to differ on resume).
NOT_FINGERPRINTED = {"resume", "keep_checkpoints", "merge", "save_total_limit", "logging_steps",
                      "report_to", "logging_dir"}  # fmt: skip
# Fewer optimizer steps than this is hardly a schedule (warm-up and decay over a handful).
MIN_OPTIMIZER_STEPS = 10


@dataclass
class TrainResult:
    model_dir: Path
    merged_dir: Path | None
    method: str
    global_step: int
    examples: int  # trained on
    dropped: int  # left with no answer token after truncation to max_length
    truncated: int  # trained on, but the answer's tail and end-of-turn were cut at max_length
    global_batch: int  # examples per optimizer step, all processes together
    optimizer_steps: int
    warmup_steps: int
    warnings: list[str]
    final_loss: float | None
    runtime_s: float
    resumed_from: str | None
    history: list[dict] = field(default_factory=list)
    train_tokens: int = 0  # tokens of the examples trained on, one epoch (the cost's view)
    merge: dict | None = None  # how merged/ was made and how close it is (merge_and_check)

    def summary(self) -> dict:
        data = asdict(self)
        data["model_dir"] = str(self.model_dir)
        data["merged_dir"] = str(self.merged_dir) if self.merged_dir else None
        return data


def load_tokenizer(
    base_model: Path, config: TrainConfig, system_text: str
) -> PreTrainedTokenizerBase:
    """The base tokenizer with the chat template training uses (saved with the output):
    ours writes ``system_text`` when a conversation has no system message."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    apply_template(tokenizer, choose_template(config.chat_template, system_text))
    return tokenizer


@dataclass(frozen=True)
class TrainPlan:
    """What the data and settings amount to, known before training starts."""

    examples: int  # kept: some answer token within max_length
    dropped: int
    truncated: int
    global_batch: int
    optimizer_steps: int
    warmup_steps: int
    warnings: list[str]
    tokens: int = 0  # of the kept examples after truncation to max_length, one epoch


def token_lengths(
    tokenizer: PreTrainedTokenizerBase, examples: list[dict], system_text: str
) -> tuple[list[int], list[int]]:
    """(prompt tokens up to the assistant tag, whole example tokens), as trl tokenises them."""
    convs = [to_conversation(r, system_text) for r in examples]

    def lengths(conversations: list[list[dict]], **kwargs: bool) -> list[int]:
        out = tokenizer.apply_chat_template(conversations, tokenize=True, **kwargs)
        return [len(ids) for ids in (out["input_ids"] if hasattr(out, "keys") else out)]

    prompts = lengths([c["prompt"] for c in convs], add_generation_prompt=True)
    return prompts, lengths([c["prompt"] + c["completion"] for c in convs])


def optimizer_steps(kept: int, config: TrainConfig, processes: int) -> int:
    """The Trainer's count: a partial accumulation at the end of an epoch is a step too."""
    if config.max_steps:
        return config.max_steps
    batches = math.ceil(kept / (config.per_device_batch_size * processes))
    per_epoch = max(math.ceil(batches / config.accumulation_steps(processes)), 1)
    return math.ceil(config.epochs * per_epoch)


def plan_training(
    examples: list[dict], tokenizer: PreTrainedTokenizerBase, config: TrainConfig, system_text: str
) -> TrainPlan:
    """Counts, optimizer steps and warm-up for these examples, with what looks wrong in them."""
    return plan_from_lengths(*token_lengths(tokenizer, examples, system_text), config)


def plan_from_lengths(prompts: list[int], full: list[int], config: TrainConfig) -> TrainPlan:
    """``plan_training`` from (prompt tokens, whole example tokens) per example."""
    limit = config.max_length
    dropped = sum(p >= limit for p in prompts)
    truncated = sum(p < limit < n for p, n in zip(prompts, full, strict=True))
    kept, processes = len(prompts) - dropped, world_size()
    if not kept:
        raise InputError(
            f"every example's prompt alone fills max_length {limit}: nothing to learn",
            field="max_length",
        )
    global_batch = config.per_device_batch_size * config.accumulation_steps(processes) * processes
    steps = optimizer_steps(kept, config, processes)
    warmup = (
        config.warmup_steps
        if config.warmup_ratio is None
        else math.ceil(config.warmup_ratio * steps)
    )
    warnings = []
    if dropped:
        warnings.append(f"{dropped} examples dropped: the prompt alone fills max_length {limit}")
    if truncated:
        warnings.append(
            f"{truncated} of {kept} examples are longer than max_length {limit} tokens: their "
            "answers lose the tail and the end-of-turn token"
        )
    if config.max_steps is None and steps < MIN_OPTIMIZER_STEPS:
        warnings.append(
            f"only {steps} optimizer steps: {kept} examples at a global batch of {global_batch}; "
            "lower global_batch_size for a real schedule"
        )
    if warmup >= steps:
        warnings.append(f"the warm-up ({warmup} steps) lasts the whole training ({steps} steps)")
    tokens = sum(min(n, limit) for p, n in zip(prompts, full, strict=True) if p < limit)
    return TrainPlan(kept, dropped, truncated, global_batch, steps, warmup, warnings, tokens)


def world_size() -> int:
    """Processes in this training (set by ``accelerate launch`` / torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (before the Trainer has set up the process group)."""
    return os.environ.get("RANK", "0") == "0"


def trainer_arguments(
    config: TrainConfig, out_dir: Path, precision: str, warmup_steps: int
) -> dict:
    """The ``TrainingArguments`` every selfalign trainer shares (SFT, DPO): schedule,
    batch, precision, checkpoints and logging."""
    return dict(
        output_dir=str(out_dir / CHECKPOINT_SUBDIR),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.accumulation_steps(world_size()),
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=warmup_steps,
        optim=config.optimizer,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        max_length=config.max_length,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=config.gradient_checkpointing,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        report_to=trainer_report_to(config.report_to),  # a missing package: InputError here
        # no accelerator: CPU processes (gloo under accelerate launch), never a silent no-DDP run
        ddp_find_unused_parameters=False,  # frozen weights do not require grad: nothing unused
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )


def sft_arguments(
    config: TrainConfig, out_dir: Path, precision: str, warmup_steps: int
) -> SFTConfig:
    return SFTConfig(
        **trainer_arguments(config, out_dir, precision, warmup_steps),
        # prompt-completion data: labels -100 on the prompt, the answer is trained
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
    )


def build_trainer(
    examples: list[dict],
    base_model: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    system_text: str,
    callbacks: list[TrainerCallback] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    plan: TrainPlan | None = None,
) -> SFTTrainer:
    """The ready-to-train ``SFTTrainer``; its ``train_dataset`` holds the tokenised labels.
    ``tokenizer`` and ``plan``: ``load_tokenizer`` and ``plan_training``, if already made."""
    base_model, out_dir = Path(base_model).resolve(), Path(out_dir)
    check_base_model(base_model)
    check_method(config)
    dataset = conversation_dataset(examples, system_text)
    precision = resolve_precision(config)
    tokenizer = tokenizer or load_tokenizer(base_model, config, system_text)
    plan = plan or plan_training(examples, tokenizer, config, system_text)
    # before the model: DeepSpeed ZeRO-3 init
    args = sft_arguments(config, out_dir, precision, plan.warmup_steps)
    set_seed(config.seed)  # the LoRA initialisation draws from the global RNG
    model = load_base_model(base_model, config, precision)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[
            *(callbacks or []),
            *report_callbacks(config.report_to, out_dir, config.logging_dir),
        ],
    )


def inputs_fingerprint(
    examples: list[dict], base_model: Path, config: TrainConfig, system_text: str
) -> str:
    """What a checkpoint depends on; a checkpoint of other inputs must not be resumed."""
    settings = config.model_dump(exclude=NOT_FINGERPRINTED)
    h = hashlib.sha256()
    for part in (settings, str(Path(base_model).resolve()), system_text, world_size()):
        h.update(json.dumps(part, sort_keys=True).encode())
    for record in examples:
        h.update(json.dumps([record["prompt"], record["answer"]]).encode())
    return h.hexdigest()


def train_sft(
    examples: list[dict],
    base_model: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    system_text: str,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Fine-tune ``base_model`` to answer each record's ``prompt`` with its ``answer``.

    The model sees ``system_text`` + the user turn (our chat template) and learns the answer
    tokens only. Runs as one process or under ``accelerate launch``; the files are written by
    the main process, and every process returns the same result.
    """
    started = time.monotonic()
    examples = validate_examples(examples)
    base_model, out_dir = Path(base_model).resolve(), Path(out_dir)
    check_base_model(base_model)
    check_method(config)
    ckpt_dir = out_dir / CHECKPOINT_SUBDIR
    fingerprint = inputs_fingerprint(examples, base_model, config, system_text)
    tokenizer = load_tokenizer(base_model, config, system_text)
    plan = plan_training(examples, tokenizer, config, system_text)
    if is_main_process():
        for warning in plan.warnings:
            log.warning(warning)
    trainer = build_trainer(
        examples, base_model, out_dir, config, system_text=system_text, callbacks=callbacks,
        tokenizer=tokenizer, plan=plan,
    )  # fmt: skip
    resume_from = resume_point(ckpt_dir, fingerprint, config.resume)
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(out_dir))  # adapter (or full weights) + tokenizer, on the main process

    history = loss_history(trainer.state.log_history)
    template_check = None
    if is_main_process():
        convs = [c["prompt"] + c["completion"] for c in conversation_dataset(examples, system_text)]
        rows = list(trainer.train_dataset)
        template_check = template_round_trip(out_dir, convs, rows, config.max_length)
        if not template_check["ok"]:
            log.warning("the saved chat template does not reproduce the trained ids: %s",
                        template_check)  # fmt: skip
    result = TrainResult(
        model_dir=out_dir,
        merged_dir=None,
        method=config.method,
        global_step=trainer.state.global_step,
        examples=len(trainer.train_dataset),
        dropped=len(examples) - len(trainer.train_dataset),
        truncated=plan.truncated,
        global_batch=plan.global_batch,
        optimizer_steps=plan.optimizer_steps,
        warmup_steps=plan.warmup_steps,
        warnings=plan.warnings,
        train_tokens=plan.tokens,
        final_loss=history[-1]["loss"] if history else None,
        runtime_s=0.0,
        resumed_from=resume_from,
        history=history,
    )
    state = PartialState()
    if config.merge and config.method != "full":
        result.merged_dir = out_dir / MERGED_SUBDIR
    del trainer  # free the training copy before merging reloads the base
    if state.is_main_process:
        if result.merged_dir is not None:
            result.merge = merge_trained(
                out_dir, result.merged_dir, examples, system_text,
                method=config.method, precision=resolve_precision(config),
            )  # fmt: skip
            result.warnings.extend(result.merge["warnings"])
        if not config.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        result.runtime_s = round(time.monotonic() - started, 3)
        write_json_atomic(
            out_dir / TRAIN_LOG,
            {
                **result.summary(),
                "base_model": str(base_model),
                "system_text": system_text,
                "processes": world_size(),
                "precision": resolve_precision(config),
                "template_check": template_check,
                "config": config.model_dump(mode="json"),
            },
        )
    state.wait_for_everyone()
    result.runtime_s = round(time.monotonic() - started, 3)
    return result
