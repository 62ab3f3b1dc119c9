"""``TrainConfig``: every knob of supervised fine-tuning, embeddable in a run config YAML.

Defaults are SELF-ALIGN's principle-engraving schedule: LoRA r=16, alpha=16, dropout 0.05
on q/k/v/o, AdamW, lr 4e-4, warm-up then linear decay, 1 epoch, max length 512, and a
global batch of 768 on any number of devices (4 per device, gradient accumulation derived).

Warm-up: the paper's 100 steps were about a fifth of its ~470 optimizer steps (~360k
examples / 768), and a fixed 100 would never end on a small data set, so the default is
that fraction, ``warmup_ratio: 0.2``. Give ``warmup_steps`` alone for a fixed count, and
``gradient_accumulation_steps`` alone to replace the default global batch.

The later QLoRA recipe is ``method: qlora, lora_r: 64, target_modules: all-linear,
learning_rate: 1.0e-4, lr_scheduler: cosine, warmup_ratio: 0.03, global_batch_size: 128``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from selfalign.errors import InputError
from selfalign.train.reporting import ReportTo
from selfalign.validation import ConfigPath, StrictModel, describe_error, field_path, load_yaml


class TrainConfig(StrictModel):
    method: Literal["lora", "qlora", "full"] = "lora"
    # LoRA / QLoRA adapter
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # optimisation schedule
    learning_rate: float = Field(4e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(100, ge=0, description="used when warmup_ratio is null")
    warmup_ratio: float | None = Field(
        0.2,
        ge=0,
        lt=1,
        description="warm-up as a fraction of the optimizer steps, instead of warmup_steps; "
        "null when warmup_steps is given without it",
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = (
        "adamw_torch"
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    max_length: int = Field(512, gt=0, description="tokens; longer examples are cut at the end")
    # batch: global = per_device_batch_size x gradient_accumulation_steps x processes
    per_device_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="used when global_batch_size is null"
    )
    global_batch_size: int | None = Field(
        768,
        gt=0,
        description="examples per optimizer step over all processes; gradient accumulation is "
        "derived from it; null when gradient_accumulation_steps is given without it",
    )
    # numerics and memory
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    # checkpoints and logging
    save_steps: int = Field(100, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    resume: bool = True
    keep_checkpoints: bool = False
    logging_steps: int = Field(1, gt=0)
    report_to: ReportTo = Field(
        [], description="training logs: tensorboard, wandb, mlflow, trackio, ... ([] or none: off)"
    )
    logging_dir: ConfigPath | None = Field(
        None, description="TensorBoard's event files; default: logs/ inside the model folder"
    )
    seed: int = 0
    # output
    merge: bool = False
    chat_template: str | None = Field(
        None,
        description="selfalign (default: ours), chatml, llama3, clone:PATH (another local "
        "tokenizer's template and end-of-turn token) or a Jinja template",
    )

    @model_validator(mode="before")
    @classmethod
    def _explicit_count_wins(cls, data: object) -> object:
        """``warmup_steps`` / ``gradient_accumulation_steps`` given without ``warmup_ratio`` /
        ``global_batch_size`` are fixed counts: the derived defaults must not override them."""
        if isinstance(data, dict):
            data = dict(data)
            if "warmup_steps" in data:
                data.setdefault("warmup_ratio", None)
            if "gradient_accumulation_steps" in data:
                data.setdefault("global_batch_size", None)
        return data

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if (
            self.global_batch_size is not None
            and self.global_batch_size % self.per_device_batch_size
        ):
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size} (768, the method's, is "
                "the default: set global_batch_size to change it)"
            )
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Gradient accumulation for ``world_size`` processes."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        return accumulation_for(
            self.global_batch_size, self.per_device_batch_size, world_size,
            field="global_batch_size", label=str(self.global_batch_size),
        )  # fmt: skip


def accumulation_for(
    global_batch: int, per_device: int, world_size: int, *, field: str, label: str
) -> int:
    """Gradient accumulation steps so that an optimizer step sees ``global_batch``
    examples over ``world_size`` processes of ``per_device`` each; a one-line InputError
    on ``field`` (``label`` opens the message) when they do not divide it."""
    per_step = per_device * world_size
    if global_batch % per_step:
        raise InputError(
            f"{label} is not a multiple of per_device_batch_size x processes "
            f"({per_device} x {world_size})",
            field=field,
        )
    return global_batch // per_step


def parse_train_config(data: object, *, file: str | Path | None = None) -> TrainConfig:
    """Validate a mapping into ``TrainConfig``; errors become one-line ``InputError``s."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("a training config must be a mapping of settings", file=file)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        loc, msg = describe_error(exc)
        raise InputError(msg, file=file, field=field_path(loc) or None) from None


def load_train_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    return parse_train_config(load_yaml(path), file=path)


class DPOSettings(StrictModel):
    """The preference loss of a DPO run (trl's ``DPOConfig``); the schedule, batch and
    adapter are a ``TrainConfig``."""

    beta: float = Field(
        0.1, gt=0, description="how far the policy may move from the reference (higher: less)"
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero"] = Field(
        "sigmoid", description="sigmoid is the DPO paper's loss; ipo, hinge, ... as in trl"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="robust DPO: the chance a pair's label is flipped"
    )


# DPO's schedule: continuing an adapter needs a smaller step than SFT (lr 5e-5 against
# 4e-4), a short warm-up, global batch 64 and sequences of up to 1024 tokens (prompt + the
# longer answer).
DPO_TRAIN_DEFAULTS: dict[str, object] = {
    "learning_rate": 5e-5, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
    "global_batch_size": 64, "max_length": 1024,
}  # fmt: skip


def with_defaults(defaults: dict[str, object], given: object) -> object:
    """A stage's own training defaults under the settings a config gives (a mapping), so
    ``train: {epochs: 2}`` keeps the rest of the stage's schedule, not ``TrainConfig``'s.
    A fixed ``warmup_steps`` or ``gradient_accumulation_steps`` given alone still wins over
    a default ratio or global batch (as in ``TrainConfig``)."""
    if not isinstance(given, dict):
        return given
    base = dict(defaults)
    if "warmup_steps" in given:
        base.pop("warmup_ratio", None)
    if "gradient_accumulation_steps" in given:
        base.pop("global_batch_size", None)
    return {**base, **given}
