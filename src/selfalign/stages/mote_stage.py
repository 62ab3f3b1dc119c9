"""The ``mote`` stage: train MoTE (or a baseline) on the AlignCoT chains, then answer
questions with step-wise decoding.

Training: ``selfalign.mote.train_mote`` on the kept chains into ``mote/model`` (a model
directory ``load_mote`` reads; ``train.method`` picks MoTE or a baseline: mote,
mote_no_shared, mote_no_skip, mote_no_both, lora, expanded, vanilla_moe, mixlora). It
resumes from its checkpoints when ``train.save_strategy`` writes them; once built, the
runner records the model and a resumed stage goes straight to the answers.
``launch: {num_processes, accelerate_config}`` trains under ``accelerate launch``
(``python -m selfalign.mote.train_entry``) as DDP, as the SFT stages do; an accelerate
config for FSDP or DeepSpeed ZeRO-3 is refused at the start.

``rows``: the paper's ablation table in one stage. Each listed method is trained with the
same recipe and seed on the same chains into ``mote/rows/{method}`` (the manifest lists
them under ``artifacts``) and answers the same questions; the eval stage scores it as the
model ``mote:{method}``. A killed stage resumes at the method it was on.

Answers (``mote/records.jsonl``): ``answer.questions`` (a query file, same formats as the
chains stage) or, without one, the first ``answer.limit`` chain questions, which the
model was trained on (the manifest says which). One record per question::

    {"id", "method", "question", "mode", "steps": [{"step", "text"}, ...], "answer",
     "length": "answer_only"|"analysis_answer"|"guidance_answer"|"full"|"unfinished",
     "finished": bool}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from selfalign.config import StageConfig
from selfalign.errors import StageError
from selfalign.mote.config import METRICS_FILE, MoteTrainConfig, TrainMethod
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


ROWS_DIR = "mote/rows"  # the ablation rows' models, one folder per method


class MoteStageConfig(StageConfig):
    train: MoteTrainConfig = Field(default_factory=MoteTrainConfig)
    rows: list[TrainMethod] = Field(
        [], description="further methods trained with the same recipe (ablation rows)"
    )
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    max_chains: int | None = Field(None, ge=1, description="train on the first N chains only")

    @model_validator(mode="after")
    def _distinct_rows(self) -> MoteStageConfig:
        methods = [self.train.method, *self.rows]
        if len(set(methods)) < len(methods):
            raise ValueError(f"rows: each method once, train.method included ({methods})")
        return self

    def methods(self) -> list[str]:
        """Every method the stage trains: ``train.method`` first, then the rows."""
        return [self.train.method, *self.rows]


def row_artifact(method: str) -> str:
    """Where an ablation row's model goes, relative to the run directory."""
    return f"{ROWS_DIR}/{method}"


def _train_config(ctx: StageContext, method: str) -> MoteTrainConfig:
    """The recipe for ``method``, seeded by the run's seed unless the config sets
    ``train.seed`` (every row starts from the same seed)."""
    train = ctx.config.train
    update: dict[str, Any] = {"method": method}
    if "seed" not in train.model_fields_set:
        update["seed"] = ctx.run.seed
    return train.model_copy(update=update)


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


def _record(rid: str, method: str, out, mode: str) -> dict[str, Any]:
    return {
        "id": rid,
        "method": method,
        "question": out.question,
        "mode": mode,
        "steps": [{"step": s, "text": getattr(out, s) or ""} for s in out.steps],
        "answer": out.answer or "",
        "length": chain_length(out.steps) if out.finished else "unfinished",
        "finished": out.finished,
    }


def _train_stats(folder: Path) -> dict[str, Any]:
    metrics_file = folder / METRICS_FILE
    if not metrics_file.is_file():
        return {}
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    keep = ("method", "chains", "examples", "truncated", "tokens", "loss_tokens", "steps",
            "train_loss", "train_runtime")  # fmt: skip
    return {k: metrics[k] for k in keep if k in metrics}


def _answer_stats(records: list[dict]) -> dict[str, Any]:
    return {
        "by_length": dict(Counter(r["length"] for r in records).most_common()),
        "finished": sum(r["finished"] for r in records),
    }


def summarize(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict[str, Any]:
    """The main method's training and answers as before; each row's under ``rows``."""
    cfg: MoteStageConfig = ctx.config  # type: ignore[assignment]
    main = cfg.train.method
    stats: dict[str, Any] = {}
    if train := _train_stats(ctx.artifact()):
        stats["train"] = train
    settings: AnswerSettings = cfg.answer
    if settings.enabled:
        mine = [r for r in records if r.get("method", main) == main]
        stats["answers"] = {"mode": settings.mode, "source": _source(settings),
                            **_answer_stats(mine)}  # fmt: skip
    if cfg.rows:
        stats["rows"] = {}
        for method in cfg.rows:
            row: dict[str, Any] = {"train": _train_stats(ctx.artifact(path=row_artifact(method)))}
            if settings.enabled:
                row["answers"] = _answer_stats([r for r in records if r.get("method") == method])
            stats["rows"][method] = row
    return stats


def run_mote(ctx: StageContext) -> Iterator[Artifact | MapWork]:
    cfg: MoteStageConfig = ctx.config  # type: ignore[assignment]
    records = ctx.inputs("chains")[: cfg.max_chains]

    def builder(method: str):
        def build(folder: Path) -> None:
            from selfalign.mote import parse_chains, train_mote
            from selfalign.mote.train_entry import check_launch, launch_mote

            check_launch(cfg.launch)  # before the chains are read or anything launched
            chains = parse_chains(records, file=ctx.run_dir / "chains" / "records.jsonl")
            if not chains:
                raise StageError("the chains stage kept no chains: nothing to train on")
            lengths = Counter(r.get("length") for r in records)
            ctx.log(f"training {method} on {len(chains)} chains ({dict(lengths)})")
            base, config = base_model_dir(ctx.run.model), _train_config(ctx, method)
            if cfg.launch.num_processes == 1 and cfg.launch.accelerate_config is None:
                train_mote(chains, base, folder, config)
            else:
                launch_mote(chains, base, folder, config, cfg.launch)

        return build

    for method in cfg.methods():  # each model answers before the next one trains
        path = None if method == cfg.train.method else row_artifact(method)
        yield Artifact(builder(method), examples=len(records), path=path)
        if cfg.answer.enabled:
            yield _answers(ctx, cfg.answer, method, path)


def _answers(
    ctx: StageContext, settings: AnswerSettings, method: str, path: str | None
) -> MapWork[str]:
    """``method``'s answers; the main method's record ids are those of a stage without
    rows, a row's carry its method."""
    loaded: list = []  # (model, tokenizer), loaded when a chunk is left to answer

    def load() -> None:
        from selfalign.mote import load_mote

        device, dtype = _device(settings.device)
        loaded.extend(load_mote(ctx.artifact(path=path), dtype=dtype, device=device))
        ctx.log(f"{method} answering questions ({_source(settings)}) in {settings.mode} mode")

    def answer(chunk: list[tuple[str, str]]) -> Batch:
        from selfalign.mote import generate_steps

        model, tokenizer = loaded
        outputs = generate_steps(
            model, tokenizer, [q for _, q in chunk], mode=settings.mode,
            max_new_tokens=settings.max_new_tokens, max_step_tokens=settings.max_step_tokens,
            temperature=settings.temperature, top_p=settings.top_p,
            seed=ctx.seed_for("answers", chunk[0][0]), batch_size=settings.batch_size,
        )  # fmt: skip
        return Batch(keep=[_record(i, method, o, settings.mode)
                           for (i, _), o in zip(chunk, outputs, strict=True)])  # fmt: skip

    key = () if path is None else (method,)
    items = {record_id("mote-answer", *key, q): q for q in _questions(ctx)}
    return MapWork(items, settings.chunk_size, answer, start=load)


def estimate(cfg: MoteStageConfig, ectx: EstimateContext) -> Estimate:
    """Trains on the kept chains (``max_chains`` at most); then answers its questions in
    process (not through a backend), up to ``answer.max_new_tokens`` each; all of it once
    per method (``train.method`` and each row)."""
    chains = ectx.inputs("chains")
    n = min(chains, cfg.max_chains or chains)
    t = cfg.train
    tokens = train_token_bound(n, epochs=t.epochs, max_steps=t.max_steps, batch=t.batch_size,
                               max_length=t.max_length)  # fmt: skip
    one = Estimate(train_examples=n, train_tokens=tokens)
    settings: AnswerSettings = cfg.answer
    if settings.enabled:
        if settings.questions is not None:
            n = len(load_queries(settings.questions, settings.limit))
        else:
            n = min(chains, settings.limit or chains)
        per = ectx.typical_prompt_tokens
        one = one + Estimate(n, n * per, n * settings.max_new_tokens, outputs=n)
    return sum([one] * (len(cfg.rows) + 1), Estimate())


STAGE = Stage(
    "mote", MoteStageConfig, run_mote, inputs=("chains",), summarize=summarize,
    artifact="mote/model", estimate=estimate,
)  # fmt: skip
