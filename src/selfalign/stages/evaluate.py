"""The ``eval`` stage: multiple-choice benchmarks on the run's models, one JSON each.

Models: ``base`` (the run's model), ``engraved`` (base + stage-3 adapter) and ``final``
(``verbose/model``). Results land in ``eval/{model}-{benchmark}-{protocol}.json`` in the
same format the ``selfalign eval`` commands print, and the report shows them.

Protocols with a system text (TruthfulQA dromedary, HHH) give each trained model the one
it was trained with (its ``train_log.json``) and the base model a neutral one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from selfalign.backends import BackendConfig
from selfalign.config import ExistingPath, StageConfig, StrictModel
from selfalign.pipeline import Batch, StageContext, stage
from selfalign.store import atomic_write_json
from selfalign.train.export import TRAIN_LOG

ModelName = Literal["base", "engraved", "final"]


class TruthfulQASettings(StrictModel):
    data: ExistingPath
    protocols: list[Literal["lm-eval", "dromedary"]] = ["lm-eval", "dromedary"]
    limit: int | None = Field(None, gt=0)


class HHHSettings(StrictModel):
    data: ExistingPath
    limit: int | None = Field(None, gt=0)


class HeldoutSettings(StrictModel):
    """Answers to prompts no stage trained on, side by side in the report."""

    prompts: ExistingPath | None = Field(None, description="JSONL; default: the shipped 24")
    max_new_tokens: int = Field(160, gt=0)
    icl: bool = Field(True, description="also the base model under the stage-2 prompt")


class EvalStageConfig(StageConfig):
    models: list[ModelName] = ["base", "engraved", "final"]
    truthfulqa: TruthfulQASettings | None = None
    hhh: HHHSettings | None = None
    heldout: HeldoutSettings | None = None


def model_backend(ctx: StageContext, name: ModelName) -> BackendConfig:
    base = ctx.backend_config()
    if name == "engraved":
        merged = ctx.run_dir / "engraved" / "merged"
        if merged.is_dir():
            return base.model_copy(update={"model": str(merged)})
        return base.model_copy(update={"adapter": str(ctx.run_dir / "engraved")})
    if name == "final":
        return base.model_copy(update={"model": str(ctx.run_dir / "verbose" / "model")})
    return base


def trained_system_text(ctx: StageContext, name: ModelName) -> str | None:
    """The system text ``name`` was trained with; None for the base model."""
    if name == "base":
        return None
    if name == "engraved":
        model_dir = ctx.run_dir / "engraved"
    else:  # a LoRA student logs beside its adapter, full fine-tuning in the model dir
        adapter = ctx.run_dir / "verbose" / "adapter"
        model_dir = adapter if adapter.is_dir() else ctx.run_dir / "verbose" / "model"
    return json.loads((model_dir / TRAIN_LOG).read_text(encoding="utf-8"))["system_text"]


def _summary(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict:
    return {r["name"]: {m["metric"]: m["value"] for m in r["metrics"]} for r in records}


def _data_files(cfg: EvalStageConfig) -> list[Path]:
    files = [s.data for s in (cfg.truthfulqa, cfg.hhh) if s is not None]
    if cfg.heldout is not None:
        from selfalign.eval.heldout import HELDOUT_PROMPTS, load_heldout

        files.append(cfg.heldout.prompts or HELDOUT_PROMPTS)
        load_heldout(files[-1])  # a bad file fails at plan time, not after training
    return files


def stage_prompt(ctx: StageContext):
    """Stage 2's in-context prompt, from the run's resolved config (``config.yaml``)."""
    from selfalign.stages.aligned import AlignedConfig, build

    stages = yaml.safe_load((ctx.run_dir / "config.yaml").read_text(encoding="utf-8"))["stages"]
    return build(AlignedConfig.model_validate(stages.get("aligned") or {}))[0]


def heldout_job(ctx: StageContext, settings: HeldoutSettings, model: str) -> dict:
    """Answers of ``model`` to the held-out prompts, with their metrics."""
    from selfalign.eval.heldout import answer_heldout, heldout_metrics, load_heldout

    source: ModelName = "base" if model == "base_icl" else model  # type: ignore[assignment]
    rows = answer_heldout(
        ctx.backend(model_backend(ctx, source)), load_heldout(settings.prompts),
        # the base model sees exactly the prompt the engraved model is trained on
        system_text=trained_system_text(ctx, source) or trained_system_text(ctx, "engraved"),
        max_new_tokens=settings.max_new_tokens,
        icl=stage_prompt(ctx) if model == "base_icl" else None,
    )  # fmt: skip
    metrics = heldout_metrics(rows)
    return {"benchmark": "heldout", "protocol": "greedy", "model": model, "metrics": metrics,
            "answers": rows}  # fmt: skip


@stage(
    "eval",
    config=EvalStageConfig,
    inputs=("engraved", "verbose"),
    summarize=_summary,
    data_files=_data_files,
)
def run_eval(ctx: StageContext) -> Iterator[Batch]:
    from selfalign.eval.hhh import HHH_SYSTEM, evaluate_hhh
    from selfalign.eval.truthfulqa import DROMEDARY_SYSTEM, evaluate_truthfulqa

    cfg: EvalStageConfig = ctx.config  # type: ignore[assignment]
    jobs = []  # (model whose backend runs it, model name, benchmark, protocol)
    for model in cfg.models:
        if cfg.heldout is not None:
            jobs.append((model, model, "heldout", "greedy"))
            if model == "base" and cfg.heldout.icl:
                jobs.append((model, "base_icl", "heldout", "greedy"))
        if cfg.truthfulqa is not None:
            for protocol in cfg.truthfulqa.protocols:
                jobs.append((model, model, "truthfulqa", protocol))
        if cfg.hhh is not None:
            jobs.append((model, model, "hhh", "both-orders"))
    name_of = {job: f"{job[1]}-{job[2]}-{job[3]}" for job in jobs}
    ctx.set_total(len(jobs))
    for model in cfg.models:
        todo = [j for j in jobs if j[0] == model and name_of[j] not in ctx.done_ids]
        if not todo:
            continue
        backend = ctx.backend(model_backend(ctx, model))
        system = trained_system_text(ctx, model)
        for job in todo:
            _, name, benchmark, protocol = job
            if benchmark == "heldout":
                data = heldout_job(ctx, cfg.heldout, name)
            elif benchmark == "truthfulqa":
                data = evaluate_truthfulqa(
                    backend, cfg.truthfulqa.data, model=model, protocol=protocol,
                    limit=cfg.truthfulqa.limit, system=system or DROMEDARY_SYSTEM,
                )[0].as_dict()  # fmt: skip
            else:
                data = evaluate_hhh(
                    backend, cfg.hhh.data, model=model, limit=cfg.hhh.limit,
                    system=system or HHH_SYSTEM,
                )[0].as_dict()  # fmt: skip
            atomic_write_json(ctx.dir / f"{name_of[job]}.json", data)
            record = {k: v for k, v in data.items() if k != "answers"}
            yield Batch(keep=[{"id": name_of[job], "name": name_of[job], **record}])
        ctx.close()
