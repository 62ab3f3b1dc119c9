"""SELF-ALIGN stage 3, principle engraving.

Fine-tune the base model on stage 2's (prompt, answer) pairs with the principles and
exemplars removed: the model sees only a brief system text and the user turn, and learns
the answer tokens. Output: ``engraved/``, a Hugging Face model directory (LoRA adapter,
tokenizer with our chat template, merged weights under ``merged/`` when asked).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from selfalign.config import DEFAULT_ASSISTANT_NAME, StageConfig
from selfalign.errors import StageError
from selfalign.stages.api import Artifact, Estimate, EstimateContext, Stage, StageContext
from selfalign.stages.training import (
    PLAIN_SYSTEM_TEXT,
    LaunchConfig,
    base_model_dir,
    sft_train_tokens,
    train_model,
    training_summary,
)
from selfalign.stages.turn_end import TurnEndCheck, check_turn_end, turn_end_stats
from selfalign.train.config import TrainConfig


class EngraveConfig(StageConfig):
    RUN_NAME_FIELD = "assistant_name"

    assistant_name: str = Field(DEFAULT_ASSISTANT_NAME, description="from the run's assistant_name")
    system_text: str = Field(PLAIN_SYSTEM_TEXT, description="'{name}' is replaced")
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    max_examples: int | None = Field(
        None, gt=0, description="train on N pairs drawn at random (run seed) from all of them"
    )
    turn_end: TurnEndCheck = Field(default_factory=TurnEndCheck)


def training_pairs(
    records: list[dict],
    max_examples: int | None,
    seed: int,
    fields: tuple[str, ...] = ("prompt", "answer"),
) -> list[dict]:
    """The ``fields`` of an upstream stage's records (stage 2's (prompt, answer) pairs, or
    preference pairs). A cap draws a seeded sample, not the head of the file, whose order is
    the upstream working order (self-instruct before TGRT, say): the first N could hold no
    red-team pair at all."""
    pairs = [{k: r[k] for k in fields} for r in records]
    if max_examples is not None and max_examples < len(pairs):
        pairs = random.Random(seed).sample(pairs, max_examples)
    return pairs


def _summary(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict:
    return {**training_summary(ctx.artifact()), **turn_end_stats(ctx)}


def run_engrave(ctx: StageContext) -> Iterator[Artifact]:
    cfg: EngraveConfig = ctx.config  # type: ignore[assignment]
    pairs = training_pairs(ctx.inputs("aligned"), cfg.max_examples, ctx.seed_for("max_examples"))
    if not pairs:
        raise StageError("stage 2 kept no (prompt, answer) pairs: nothing to engrave")
    system_text = cfg.system_text.replace("{name}", cfg.assistant_name)

    def build(folder: Path) -> None:
        ctx.log(f"fine-tuning on {len(pairs)} pairs without the principles")
        train_model(pairs, base_model_dir(ctx.run.model), folder, cfg.train, system_text,
                    cfg.launch)  # fmt: skip

    yield Artifact(build, examples=len(pairs))
    check_turn_end(ctx, ctx.artifact(), cfg.turn_end)


def estimate(cfg: EngraveConfig, ectx: EstimateContext) -> Estimate:
    """No generation: it trains on stage 2's kept pairs (``max_examples`` at most)."""
    n = ectx.inputs("aligned")
    n = min(n, cfg.max_examples or n)
    return Estimate(train_examples=n, train_tokens=sft_train_tokens(n, cfg.train))


STAGE = Stage(
    "engraved", EngraveConfig, run_engrave, inputs=("aligned",), summarize=_summary,
    artifact="engraved", estimate=estimate,
)  # fmt: skip
