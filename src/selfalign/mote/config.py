"""MoTE's settings, importable without torch: a run config validates them before any
model is loaded (``selfalign run --dry-run`` included)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from selfalign.train.config import accumulation_for
from selfalign.train.reporting import ReportTo
from selfalign.validation import ConfigPath, StrictModel

SHARED = "shared"  # the shared expert's name
CONFIG_FILE = "mote_config.json"  # marks a MoTE model directory
METRICS_FILE = "train_metrics.json"  # written last by train_mote: the model is complete
# Per-device batch when none is given: small, for a 7-8B model's activations on one GPU.
DEFAULT_PER_DEVICE = 2
TrainMethod = Literal[
    "mote", "mote_no_shared", "mote_no_skip", "mote_no_both", "lora", "expanded", "vanilla_moe",
    "mixlora",
]  # fmt: skip
# Methods whose experts a learned token-level gate picks, not the chain's steps.
GATED = ("vanilla_moe", "mixlora")


class MoteConfig(StrictModel):
    """Architecture of the experts (saved with the model)."""

    rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)  # peft scaling = lora_alpha / rank
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    alpha: float = Field(0.5, ge=0, le=1)  # step expert weight; shared gets 1 - alpha
    shared_expert: bool = True
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # Expert for question tokens outside training (training draws one at random per sequence).
    # "answer" by default: every chain has an answer, so that expert sees the most data.
    question_expert: Literal["analysis", "guidance", "answer", "shared"] = "answer"
    seed: int = 0
    # The ablation rows' routing. "step": by the chain's steps (MoTE). "gate": a learned
    # linear gate per layer picks the top_k step experts per token (Vanilla MoE, MixLoRA),
    # with a load-balancing loss and, for MixLoRA, a contrastive loss between experts.
    routing: Literal["step", "gate"] = "step"
    top_k: int = Field(2, ge=1, le=3)
    balance_weight: float = Field(0.01, ge=0)
    contrastive_weight: float = Field(0.0, ge=0)
    # Decoding as the expanded baseline was trained: at each step switch the whole context
    # is recomputed by the new step's expert, instead of keeping earlier tokens' K/V.
    recompute_at_switch: bool = False

    @model_validator(mode="after")
    def _shared_needed(self) -> MoteConfig:
        if self.question_expert == SHARED and not self.shared_expert:
            raise ValueError("question_expert 'shared' needs shared_expert: true")
        if self.routing == "gate" and self.shared_expert:
            raise ValueError("gate routing mixes the step experts alone: shared_expert: false")
        return self


class MoteTrainConfig(StrictModel):
    """Training recipe; defaults follow the paper (3 epochs, lr 2e-5, batch 16, rank 16),
    with the memory settings of a 7-8B base on one GPU per process: activation
    checkpointing on and a small per-device batch, the rest by gradient accumulation."""

    method: TrainMethod = "mote"
    mote: MoteConfig = Field(default_factory=MoteConfig)
    # Probability that a later step hides some earlier steps (mote.data.example_draws).
    step_skip_prob: float = Field(0.25, ge=0, le=1)  # not given by the paper: ours
    system: str | None = None  # system prompt of the chat format, kept with the model
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(
        16, ge=1, description="examples per optimizer step over all processes (global batch)"
    )
    per_device_batch_size: int | None = Field(
        None,
        ge=1,
        description="default: the largest divisor of each process's share of batch_size up "
        f"to {DEFAULT_PER_DEVICE}; gradient accumulation makes up the rest",
    )
    max_length: int = Field(2048, ge=8)
    lr_scheduler: str = "cosine"
    warmup: float = Field(0.03, ge=0)  # ratio of steps if < 1, else steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On by default: at 7-8B activations, not the LoRA-sized experts, fill the GPU.
    gradient_checkpointing: bool = True
    # The base in 4-bit NF4 (bitsandbytes, CUDA only); the experts still train in float32.
    quantize_base: bool = False
    # Packed chains need a 4D attention mask: sdpa or eager, not flash-attention.
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    logging_steps: int = 10
    report_to: ReportTo = Field(
        [], description="training logs: tensorboard, wandb, mlflow, trackio, ... ([] or none: off)"
    )
    logging_dir: ConfigPath | None = Field(
        None, description="TensorBoard's event files; default: logs/ inside the model folder"
    )
    save_strategy: Literal["no", "epoch", "steps"] = "no"
    save_steps: int = 500
    resume: bool = True  # continue from the last checkpoint in out_dir/checkpoints
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _check_batch(self) -> MoteTrainConfig:
        if self.per_device_batch_size and self.batch_size % self.per_device_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size}"
            )
        return self

    def per_device(self, world_size: int = 1) -> int:
        """Examples per forward pass on one process."""
        if self.per_device_batch_size is not None:
            return self.per_device_batch_size
        share = max(1, self.batch_size // world_size)
        return max(d for d in range(1, min(DEFAULT_PER_DEVICE, share) + 1) if share % d == 0)

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Gradient accumulation so that an optimizer step sees ``batch_size`` examples."""
        return accumulation_for(
            self.batch_size, self.per_device(world_size), world_size,
            field="batch_size", label=f"batch_size {self.batch_size}",
        )  # fmt: skip

    def resolved_mote(self) -> MoteConfig:
        """The expert architecture after the method's overrides: no shared expert for
        ``mote_no_shared``, ``mote_no_both`` and the gated methods; a gate for
        ``vanilla_moe`` (load balancing) and ``mixlora`` (plus the contrastive loss, 0.1
        unless set); recomputation at step switches for ``expanded``."""
        update: dict[str, object] = {}
        if self.method in ("mote_no_shared", "mote_no_both", *GATED):
            question = self.mote.question_expert
            update |= {"shared_expert": False,
                       "question_expert": "answer" if question == SHARED else question}  # fmt: skip
        if self.method in GATED:
            update["routing"] = "gate"
            if self.method == "mixlora" and "contrastive_weight" not in self.mote.model_fields_set:
                update["contrastive_weight"] = 0.1
        if self.method == "expanded":
            update["recompute_at_switch"] = True
        return self.mote.model_copy(update=update) if update else self.mote

    @property
    def skip_prob(self) -> float:
        return self.step_skip_prob if self.method in ("mote", "mote_no_shared") else 0.0


def is_mote_dir(path: str | Path) -> bool:
    """A directory written by ``save_mote``/``train_mote`` (needs ``load_mote``)."""
    return (Path(path) / CONFIG_FILE).is_file()
