"""Direct preference optimisation on (prompt, chosen, rejected) pairs with trl's ``DPOTrainer``.

DPO continues a trained model. From a LoRA (or QLoRA) adapter, such as the engraved one:
the base is loaded once, the adapter on top of it trainable, and trl keeps a frozen copy
of the adapter as the reference (its "ref" adapter), so policy and reference both start as
the trained model and a 7-8B run holds one copy of the base weights. From a fully
fine-tuned model: a fresh LoRA on it, and the reference is the same weights with the
adapter turned off. Either way the output is an adapter folder like SFT's (``train.sft``):
adapter weights, the start model's tokenizer and chat template, ``train_log.json`` (the
per-step loss and reward margins) and ``merged/`` when asked; checkpoints resume after a
kill, and the same code runs under ``accelerate launch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from selfalign.errors import InputError
from selfalign.store import file_sha256
from selfalign.train.checkpoints import resume_point
from selfalign.train.config import DPOSettings, TrainConfig
from selfalign.train.data import prompt_messages
from selfalign.train.export import (
    MERGED_SUBDIR,
    TRAIN_LOG,
    adapter_base_path,
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
from selfalign.train.reporting import report_callbacks
from selfalign.train.sft import (
    CHECKPOINT_SUBDIR,
    NOT_FINGERPRINTED,
    TrainPlan,
    TrainResult,
    is_main_process,
    plan_from_lengths,
    token_lengths,
    trainer_arguments,
    world_size,
)

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
REF_ADAPTER = "ref"  # the name trl gives the frozen copy of a continued adapter
PAIR_FIELDS = ("prompt", "chosen", "rejected")


def validate_pairs(pairs: list[dict], *, source: str | Path | None = None) -> list[dict]:
    """Each pair needs non-empty strings ``prompt``, ``chosen`` and ``rejected`` that differ."""
    for n, pair in enumerate(pairs, start=1):
        if not isinstance(pair, dict):
            raise InputError("a preference pair must be an object", file=source, line=n)
        for key in PAIR_FIELDS:
            if not isinstance(pair.get(key), str) or not pair[key].strip():
                raise InputError("missing or empty string", file=source, line=n, field=key)
        if pair["chosen"].strip() == pair["rejected"].strip():
            raise InputError("chosen and rejected are the same text", file=source, line=n,
                             field="rejected")  # fmt: skip
    if not pairs:
        raise InputError("no preference pairs", file=source)
    return pairs


def pair_dataset(pairs: list[dict], system_text: str) -> Dataset:
    """trl's conversational preference format: the prompt as messages (our system text and
    the user turn), chosen and rejected as one assistant message each."""
    return Dataset.from_list([
        {"prompt": prompt_messages(system_text, p["prompt"]),
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs
    ])  # fmt: skip


def plan_dpo(
    pairs: list[dict], tokenizer: PreTrainedTokenizerBase, config: TrainConfig, system_text: str
) -> TrainPlan:
    """``plan_training`` for pairs: a pair is as long as its longer answer, and its tokens
    are both answers' (DPO runs each through the policy and the reference)."""

    def lengths(side: str) -> tuple[list[int], list[int]]:
        rows = [{"prompt": p["prompt"], "answer": p[side]} for p in pairs]
        return token_lengths(tokenizer, rows, system_text)

    prompts, chosen = lengths("chosen")
    _, rejected = lengths("rejected")
    plan = plan_from_lengths(
        prompts, [max(c, r) for c, r in zip(chosen, rejected, strict=True)], config
    )
    limit = config.max_length
    tokens = sum(
        min(c, limit) + min(r, limit)
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
        if p < limit
    )
    return replace(plan, tokens=tokens)


def start_point(start: Path) -> tuple[Path, bool]:
    """(the base weights to load, whether ``start`` is an adapter to continue)."""
    if (start / ADAPTER_CONFIG).is_file():
        return Path(adapter_base_path(start)), True
    check_base_model(start)
    return start, False


def load_policy(start: Path, config: TrainConfig, precision: str):
    """(model, peft_config for trl): the start adapter trainable on its base, or the
    start model itself with a fresh LoRA (``config``'s settings) for trl to add."""
    base, continues = start_point(start)
    model = load_base_model(base, config, precision)
    if not continues:
        return model, lora_config(config)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, start, is_trainable=True), None


def inputs_fingerprint(
    pairs: list[dict], start: Path, config: TrainConfig, dpo: DPOSettings, system_text: str
) -> str:
    """What a checkpoint depends on: settings, the start model's weights, the pairs."""
    h = hashlib.sha256()
    weights = sorted(start.glob("*.safetensors"))
    parts = (config.model_dump(exclude=NOT_FINGERPRINTED), dpo.model_dump(), str(start.resolve()),
             [file_sha256(w) for w in weights], system_text, world_size())  # fmt: skip
    for part in parts:
        h.update(json.dumps(part, sort_keys=True).encode())
    for pair in pairs:
        h.update(json.dumps([pair[k] for k in PAIR_FIELDS]).encode())
    return h.hexdigest()


def dpo_arguments(
    config: TrainConfig, dpo: DPOSettings, out_dir: Path, precision: str, warmup_steps: int
) -> DPOConfig:
    return DPOConfig(
        **trainer_arguments(config, out_dir, precision, warmup_steps),
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
    )


def keep_adapter_fp32(model) -> int:
    """Undo trl's bf16 cast of a QLoRA run's trainable adapter weights (their values from
    the frozen fp32 reference copy where there is one): at DPO's small learning rates most
    Adam steps are below what bf16 weights can record, and policy and reference would differ
    by the rounding before the first step. Returns how many tensors were restored."""
    import torch

    params = dict(model.named_parameters())
    restored = 0
    for name, param in params.items():
        if not param.requires_grad or param.dtype == torch.float32:
            continue
        source = params.get(name.replace(".default.", f".{REF_ADAPTER}."), param)
        param.data = source.data.detach().to(torch.float32).clone()
        restored += 1
    return restored


def check_dpo_method(config: TrainConfig) -> None:
    if config.method == "full":
        raise InputError(
            "DPO trains a LoRA or QLoRA adapter (the reference is the adapter turned off or a "
            "frozen copy of it); use method lora or qlora", field="method",
        )  # fmt: skip
    check_method(config)


def train_dpo(
    pairs: list[dict],
    start: Path,
    out_dir: Path,
    config: TrainConfig,
    dpo: DPOSettings,
    *,
    system_text: str,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Prefer each pair's ``chosen`` answer over its ``rejected`` one, starting from the model
    in ``start`` (an adapter folder or a full model folder) and writing an adapter folder to
    ``out_dir``; resumes from its checkpoints after a kill."""
    started = time.monotonic()
    pairs = validate_pairs(pairs)
    start, out_dir = Path(start).resolve(), Path(out_dir)
    check_dpo_method(config)
    ckpt_dir = out_dir / CHECKPOINT_SUBDIR
    fingerprint = inputs_fingerprint(pairs, start, config, dpo, system_text)
    tokenizer = AutoTokenizer.from_pretrained(start)  # the start model's chat template
    plan = plan_dpo(pairs, tokenizer, config, system_text)
    if is_main_process():
        for warning in plan.warnings:
            log.warning(warning)
    precision = resolve_precision(config)
    args = dpo_arguments(config, dpo, out_dir, precision, plan.warmup_steps)
    set_seed(config.seed)  # a fresh LoRA's initialisation draws from the global RNG
    model, peft_config = load_policy(start, config, precision)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=pair_dataset(pairs, system_text),
        processing_class=tokenizer, peft_config=peft_config,
        callbacks=[*(callbacks or []),
                   *report_callbacks(config.report_to, out_dir, config.logging_dir)],
    )  # fmt: skip
    keep_adapter_fp32(trainer.model)  # before train() builds the optimizer
    resume_from = resume_point(ckpt_dir, fingerprint, config.resume)
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(out_dir))
    history = loss_history(trainer.state.log_history)
    result = TrainResult(
        model_dir=out_dir, merged_dir=None, method=config.method,
        global_step=trainer.state.global_step, examples=plan.examples, dropped=plan.dropped,
        truncated=plan.truncated, global_batch=plan.global_batch,
        optimizer_steps=plan.optimizer_steps, warmup_steps=plan.warmup_steps,
        warnings=plan.warnings, train_tokens=plan.tokens,
        final_loss=history[-1]["loss"] if history else None, runtime_s=0.0,
        resumed_from=resume_from, history=history,
    )  # fmt: skip
    state = PartialState()
    del trainer, model
    if state.is_main_process:
        shutil.rmtree(out_dir / REF_ADAPTER, ignore_errors=True)  # the frozen copy: not output
        if config.merge:
            result.merged_dir = out_dir / MERGED_SUBDIR
            chosen = [{"prompt": p["prompt"], "answer": p["chosen"]} for p in pairs]
            result.merge = merge_trained(out_dir, result.merged_dir, chosen, system_text,
                                         method=config.method, precision=precision)  # fmt: skip
            result.warnings.extend(result.merge["warnings"])
        if not config.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        result.runtime_s = round(time.monotonic() - started, 3)
        write_json_atomic(out_dir / TRAIN_LOG, {
            **result.summary(), "objective": "dpo", "start": str(start),
            "base_model": str(start_point(start)[0]), "system_text": system_text,
            "processes": world_size(), "precision": precision,
            "initial_loss": history[0]["loss"] if history else None,
            "config": config.model_dump(mode="json"), "dpo": dpo.model_dump(mode="json"),
        })  # fmt: skip
    state.wait_for_everyone()
    result.runtime_s = round(time.monotonic() - started, 3)
    return result
