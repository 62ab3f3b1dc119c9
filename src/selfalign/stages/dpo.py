"""The ``dpo`` stage: direct preference optimisation on the ``preferences`` pairs, continuing
the engraved model (``train.dpo``): its LoRA adapter trains on, and the reference is a frozen
copy of it, so policy and reference start as the engraved model on one copy of the base.

The prompt side of every pair is what the engraved model was trained on: its system text
(from its ``train_log.json``) and the user turn, through its chat template, which the DPO
model keeps. Output ``dpo/model``: an adapter folder (merged weights under ``merged/`` with
``merge: true``) with ``train_log.json`` (per-step loss and reward margins), then the
end-of-turn guard as after every training stage. Checkpoints, resume and ``accelerate
launch`` as for the SFT stages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field, field_validator

from selfalign.config import StageConfig
from selfalign.errors import StageError
from selfalign.stages.api import Artifact, Estimate, EstimateContext, Stage, StageContext
from selfalign.stages.engrave import training_pairs
from selfalign.stages.training import (
    LaunchConfig,
    sft_train_tokens,
    train_log,
    train_model,
    trained_system_text,
    training_summary,
)
from selfalign.stages.turn_end import TurnEndCheck, check_turn_end, turn_end_stats
from selfalign.train.config import DPO_TRAIN_DEFAULTS, DPOSettings, TrainConfig, with_defaults

ARTIFACT = "dpo/model"


class DPOStageConfig(StageConfig):
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(**DPO_TRAIN_DEFAULTS),  # type: ignore[arg-type]
        description="schedule and batch (defaults: DPO_TRAIN_DEFAULTS); an adapter continued "
        "keeps its own rank and modules, and its method unless one is given",
    )
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    max_pairs: int | None = Field(
        None, gt=0, description="train on N pairs drawn at random (run seed) from all of them"
    )
    turn_end: TurnEndCheck = Field(default_factory=TurnEndCheck)

    @field_validator("train", mode="before")
    @classmethod
    def _dpo_schedule(cls, value: object) -> object:
        return with_defaults(DPO_TRAIN_DEFAULTS, value)


def continuing(train: TrainConfig, start_method: str | None) -> TrainConfig:
    """DPO trains the way the engraved adapter was trained (QLoRA on a 4-bit base stays
    QLoRA) unless the config sets ``method``; a fully fine-tuned start gets a LoRA."""
    if "method" in train.model_fields_set or start_method not in ("lora", "qlora"):
        return train
    return train.model_copy(update={"method": start_method})


def _summary(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict:
    """The training summary plus DPO's last reward margin and accuracy (the share of pairs
    whose chosen answer gained more log-likelihood over the reference than the rejected)."""
    stats = training_summary(ctx.artifact())
    last = (train_log(ctx.artifact()).get("history") or [{}])[-1]
    for key in ("rewards/margins", "rewards/accuracies"):
        if key in last:
            stats[key.replace("/", "_")] = round(last[key], 4)
    return {**stats, **turn_end_stats(ctx)}


def run_dpo(ctx: StageContext) -> Iterator[Artifact]:
    cfg: DPOStageConfig = ctx.config  # type: ignore[assignment]
    pairs = training_pairs(ctx.inputs("preferences"), cfg.max_pairs, ctx.seed_for("max_pairs"),
                           ("prompt", "chosen", "rejected"))  # fmt: skip
    if not pairs:
        raise StageError("the preferences stage kept no pairs: nothing to train DPO on")
    start = ctx.artifact("engraved")
    system_text = trained_system_text(start)
    if system_text is None:
        raise StageError(f"{start} does not say which system text it was trained with")
    train = continuing(cfg.train, train_log(start).get("method"))

    def build(folder: Path) -> None:
        ctx.log(f"DPO on {len(pairs)} pairs, continuing {start.name} ({train.method})")
        train_model(pairs, start, folder, train, system_text, cfg.launch, dpo=cfg.dpo)

    yield Artifact(build, examples=len(pairs))
    check_turn_end(ctx, ctx.artifact(), cfg.turn_end)


def estimate(cfg: DPOStageConfig, ectx: EstimateContext) -> Estimate:
    """No generation: it trains on the kept pairs (``max_pairs`` at most)."""
    n = ectx.inputs("preferences")
    n = min(n, cfg.max_pairs or n)  # chosen and rejected: two sequences a pair
    return Estimate(train_examples=n, train_tokens=sft_train_tokens(n, cfg.train, sequences=2),
                    note="DPO also runs the reference model forward on both")  # fmt: skip


STAGE = Stage(
    "dpo", DPOStageConfig, run_dpo, inputs=("engraved", "preferences"), summarize=_summary,
    artifact=ARTIFACT, estimate=estimate,
)  # fmt: skip
