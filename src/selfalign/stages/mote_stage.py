"""The ``mote`` stage: train MoTE (or a baseline) on the AlignCoT chains, then answer
questions with step-wise decoding.

Training: ``selfalign.mote.train_mote`` on the kept chains into ``mote/model`` (a model
directory ``load_mote`` reads; ``train.method`` picks MoTE or a baseline: mote,
mote_no_shared, mote_no_skip, mote_no_both, lora, expanded, vanilla_moe, mixlora). It resumes from its checkpoints when
``train.save_strategy`` writes them; once built, the runner records the model and a
resumed stage goes straight to the answers. ``launch: {num_processes, accelerate_config}``
trains under ``accelerate launch`` (``python -m selfalign.mote.train_entry``) as DDP, as the
SFT stages do; an accelerate config for FSDP or DeepSpeed ZeRO-3 is refused at the start.

Answers (``mote/records.jsonl``): ``answer.questions`` (a query file, same formats as the
chains stage) or, without one, the first ``answer.limit`` chain questions, which the
model was trained on (the manifest says which). One record per question::

    {"id", "question", "mode", "steps": [{"step", "text"}, ...], "answer",
     "length": "answer_only"|"analysis_answer"|"guidance_answer"|"full"|"unfinished",
     "finished": bool}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from selfalign.config import StageConfig
from selfalign.errors import StageError
from selfalign.mote.config import METRICS_FILE, MoteTrainConfig
from selfalign.stages.api import (
    Artifact,
    Batch,
    Estimate,
    EstimateContext,
    MapWork,
    Stage,
    StageContext,
    train_token_bound,
)
from selfalign.stages.chains import load_queries
from selfalign.stages.training import LaunchConfig, base_model_dir
from selfalign.store import record_id
from selfalign.text.aligncot import chain_length
from selfalign.validation import ExistingPath, StrictModel


class AnswerSettings(StrictModel):
    enabled: bool = True
    questions: ExistingPath | None = Field(
        None, description="held-out queries; default: the first `limit` chain questions"
    )
    limit: int | None = Field(20, ge=1, description="answer the first N questions")
    mode: Literal["adaptive", "answer", "analysis_answer", "full"] = "adaptive"
    max_new_tokens: int = Field(512, ge=1, description="for the whole chain")
    max_step_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1, description="questions decoded together")
    chunk_size: int = Field(32, ge=1, description="questions per committed batch")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MoteStageConfig(StageConfig):
    train: MoteTrainConfig = Field(default_factory=MoteTrainConfig)
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    max_chains: int | None = Field(None, ge=1, description="train on the first N chains only")


def _train_config(ctx: StageContext) -> MoteTrainConfig:
    """The recipe, seeded by the run's seed unless the config sets ``train.seed``."""
    train = ctx.config.train
    if "seed" in train.model_fields_set:
        return train
    return train.model_copy(update={"seed": ctx.run.seed})


def _source(settings: AnswerSettings) -> str:
    """Where the answered questions come from (the manifest shows it)."""
    return f"file:{settings.questions.name}" if settings.questions else "training_chains"


def _questions(ctx: StageContext) -> list[str]:
    settings: AnswerSettings = ctx.config.answer
    if settings.questions is not None:
        return [q.text for q in load_queries(settings.questions, settings.limit)]
    return [c["question"] for c in ctx.inputs("chains")[: settings.limit]]


def _device(name: str) -> tuple[str, Any]:
    """(device, dtype) for answering: bf16 on a GPU that has it, float32 otherwise."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if bf16 else torch.float32


def _record(rid: str, out, mode: str) -> dict[str, Any]:
    return {
        "id": rid,
        "question": out.question,
        "mode": mode,
        "steps": [{"step": s, "text": getattr(out, s) or ""} for s in out.steps],
        "answer": out.answer or "",
        "length": chain_length(out.steps) if out.finished else "unfinished",
        "finished": out.finished,
    }


def summarize(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    metrics_file = ctx.artifact() / METRICS_FILE
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        keep = ("method", "chains", "examples", "truncated", "tokens", "loss_tokens", "steps",
                "train_loss", "train_runtime")  # fmt: skip
        stats["train"] = {k: metrics[k] for k in keep if k in metrics}
    settings: AnswerSettings = ctx.config.answer
    if settings.enabled:
        stats["answers"] = {
            "mode": settings.mode,
            "source": _source(settings),
            "by_length": dict(Counter(r["length"] for r in records).most_common()),
            "finished": sum(r["finished"] for r in records),
        }
    return stats


def run_mote(ctx: StageContext) -> Iterator[Artifact | MapWork]:
    cfg: MoteStageConfig = ctx.config  # type: ignore[assignment]
    records = ctx.inputs("chains")[: cfg.max_chains]

    def build(folder: Path) -> None:
        from selfalign.mote import parse_chains, train_mote
        from selfalign.mote.train_entry import check_launch, launch_mote

        check_launch(cfg.launch)  # before the chains are read or anything launched
        chains = parse_chains(records, file=ctx.run_dir / "chains" / "records.jsonl")
        if not chains:
            raise StageError("the chains stage kept no chains: nothing to train on")
        lengths = Counter(r.get("length") for r in records)
        ctx.log(f"training {cfg.train.method} on {len(chains)} chains ({dict(lengths)})")
        base, config = base_model_dir(ctx.run.model), _train_config(ctx)
        if cfg.launch.num_processes == 1 and cfg.launch.accelerate_config is None:
            train_mote(chains, base, folder, config)
        else:
            launch_mote(chains, base, folder, config, cfg.launch)

    yield Artifact(build, examples=len(records))
    if cfg.answer.enabled:
        yield _answers(ctx, cfg.answer)


def _answers(ctx: StageContext, settings: AnswerSettings) -> MapWork[str]:
    loaded: list = []  # (model, tokenizer), loaded when a chunk is left to answer

    def load() -> None:
        from selfalign.mote import load_mote

        device, dtype = _device(settings.device)
        loaded.extend(load_mote(ctx.artifact(), dtype=dtype, device=device))
        ctx.log(f"answering questions ({_source(settings)}) in {settings.mode} mode")

    def answer(chunk: list[tuple[str, str]]) -> Batch:
        from selfalign.mote import generate_steps

        model, tokenizer = loaded
        outputs = generate_steps(
            model, tokenizer, [q for _, q in chunk], mode=settings.mode,
            max_new_tokens=settings.max_new_tokens, max_step_tokens=settings.max_step_tokens,
            temperature=settings.temperature, top_p=settings.top_p,
            seed=ctx.seed_for("answers", chunk[0][0]), batch_size=settings.batch_size,
        )  # fmt: skip
        return Batch(
            keep=[_record(i, o, settings.mode) for (i, _), o in zip(chunk, outputs, strict=True)]
        )

    items = {record_id("mote-answer", q): q for q in _questions(ctx)}
    return MapWork(items, settings.chunk_size, answer, start=load)


def estimate(cfg: MoteStageConfig, ectx: EstimateContext) -> Estimate:
    """Trains on the kept chains (``max_chains`` at most); then answers its questions in
    process (not through a backend), up to ``answer.max_new_tokens`` each."""
    chains = ectx.inputs("chains")
    n = min(chains, cfg.max_chains or chains)
    t = cfg.train
    tokens = train_token_bound(n, epochs=t.epochs, max_steps=t.max_steps, batch=t.batch_size,
                               max_length=t.max_length)  # fmt: skip
    train = Estimate(train_examples=n, train_tokens=tokens)
    settings: AnswerSettings = cfg.answer
    if not settings.enabled:
        return train
    if settings.questions is not None:
        n = len(load_queries(settings.questions, settings.limit))
    else:
        n = min(chains, settings.limit or chains)
    per = ectx.typical_prompt_tokens
    return train + Estimate(n, n * per, n * settings.max_new_tokens, outputs=n)


STAGE = Stage(
    "mote", MoteStageConfig, run_mote, inputs=("chains",), summarize=summarize,
    artifact="mote/model", estimate=estimate,
)  # fmt: skip
